"""Images and masks in and out: PIL <-> tensors in [-1, 1], and the sizes FLUX accepts.

    img = load_image("dog.jpg", fit="crop")       # RGB PIL image, both sides multiples of 16
    x = pil_to_tensor(img)                        # (1, 3, H, W) float32 in [-1, 1]
    mask = load_mask("dog_mask.png", x.shape[-2:])  # (H, W) float in [0, 1], white = subject
    tensor_to_pil(ae.decode(z))                   # list of PIL images (clamped and rounded like diffusers)

FLUX needs H and W to be multiples of 16 (the autoencoder's 8x times the transformer's 2x2 patches). By default
a wrong size is an error; `fit="resize"` resizes to the nearest multiples of 16 (Lanczos), `fit="crop"`
center-crops down to them.

Reading is exact or refused: EXIF orientation is applied; 16-bit greyscale is scaled (v / 65535), not clipped; a
mask whose grey is uniform but whose alpha varies is read from its alpha, and one where both vary is refused
(which is the mask?); a missing, non-regular, non-image, truncated or oversized (decompression bomb, over
Image.MAX_IMAGE_PIXELS, or a side over validate.MAX_SIDE, read from the header before decoding) file is one
ValueError naming it. Every image minidit reads (img2img's input, references, masks, scenes) comes through
`open_image`. `save_png` writes atomically: a temporary file in the
target folder, renamed into place, so an interrupted write never leaves a truncated PNG nor destroys the old file.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import Tensor

from .files import open_regular
from .validate import MAX_SIDE

MULTIPLE = 16
WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16/32-bit integer greyscale: values 0..65535
FITS = ("error", "resize", "crop")


def check_size(h: int, w: int, multiple: int = MULTIPLE) -> None:
    """Raise ValueError naming the size unless both sides are positive multiples of `multiple`."""
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of {multiple}: FLUX needs both sides to be "
                         f"multiples of {multiple}; resize/crop it (load_image(..., fit='resize' or 'crop'))")


def open_image(src: str | Path | Image.Image, what: str) -> Image.Image:
    """A PIL image, fully decoded and EXIF-transposed; every way a file can be bad is one named error."""
    if isinstance(src, Image.Image):
        check_side(src, what)
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path or a PIL image, got {type(src).__name__}")
    path = Path(src)
    try:
        os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError:
        pass  # open_regular names it
    f = open_regular(path, what, None, ValueError)  # files.py: a regular file, refused from stat, never blocks
    try:
        with f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if max(im.size) <= MAX_SIDE:  # from the header, before any pixel is decoded
                    im.load()
                    return ImageOps.exif_transpose(im)  # a new, loaded image either way
                size = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{what} {path}: more than {Image.MAX_IMAGE_PIXELS} pixels, refused as a possible "
                         "decompression bomb (raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine)") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what} {path}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"{what} {path}: corrupt or truncated image ({e})") from None
    raise ValueError(f"{what} {path}: {size[0]}x{size[1]} pixels, more than {MAX_SIDE} per side; refused before "
                     "decoding it (resize it first)")


def check_side(im: Image.Image, what: str) -> None:
    """An input image's own size against validate.MAX_SIDE pixels per side (read from its header)."""
    if max(im.size) > MAX_SIDE:
        raise ValueError(f"{what}: {im.width}x{im.height} pixels, more than {MAX_SIDE} per side (resize it first)")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    return h, w


def fit_image(img: Image.Image, size: int | tuple[int, int] | None = None, fit: str = "error") -> Image.Image:
    """Resize `img` (any mode) to `size` = (height, width) or a square side if given, then make both sides
    multiples of 16 according to `fit`: "error" raises, "resize" resizes to the nearest multiples (at least
    16), "crop" center-crops down to the multiples below (error if a side is under 16)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    if size is not None:
        h, w = _size(size)
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if (img.height, img.width) != (h, w):
            img = img.resize((w, h), Image.Resampling.LANCZOS)
    h, w = img.height, img.width
    if h % MULTIPLE == 0 and w % MULTIPLE == 0:
        return img
    if fit == "error":
        check_size(h, w)
    if fit == "resize":
        nh, nw = (max(MULTIPLE, int(s / MULTIPLE + 0.5) * MULTIPLE) for s in (h, w))  # halves round up
        return img.resize((nw, nh), Image.Resampling.LANCZOS)
    nh, nw = h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE
    if nh == 0 or nw == 0:
        raise ValueError(f"image size {h}x{w} (HxW) is too small to crop to a multiple of {MULTIPLE}")
    top, left = (h - nh) // 2, (w - nw) // 2
    return img.crop((left, top, left + nw, top + nh))


def load_image(src: str | Path | Image.Image, size: int | tuple[int, int] | None = None,
               fit: str = "error") -> Image.Image:
    """An RGB PIL image from a path or PIL image, resized to `size` (height, width) if given and fitted to
    multiples of 16 per `fit` (see `fit_image`)."""
    return fit_image(to_rgb(open_image(src, "image")), size, fit)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit greyscale scaled to 8 bits (PIL's own convert would clip it at 255)."""
    if img.mode in WIDE_GREY:
        g = (_grey(img) * 255).round().to(torch.uint8)
        img = Image.frombytes("L", (img.width, img.height), g.numpy().tobytes())
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as diffusers' VaeImageProcessor)."""
    img = to_rgb(img)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return (x.permute(2, 0, 1)[None].float() / 255.0) * 2.0 - 1.0


def tensor_to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> list of RGB PIL images; values outside [-1, 1] are clamped and
    rounded as diffusers' `VaeImageProcessor.postprocess`: (x / 2 + 0.5).clamp(0, 1) * 255, round."""
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"tensor_to_pil expects (B, 3, H, W) or (3, H, W), got shape {tuple(x.shape)}")
    u8 = ((x.detach() / 2 + 0.5).clamp(0, 1).cpu().float() * 255).round().to(torch.uint8)
    return [Image.frombytes("RGB", (im.shape[2], im.shape[1]), im.permute(1, 2, 0).contiguous().numpy().tobytes())
            for im in u8]


def load_mask(src: str | Path | Image.Image | Tensor, size: int | tuple[int, int]) -> Tensor:
    """A subject mask as (H, W) float32 in [0, 1] (white / 1 = subject) from a path, PIL image (converted to
    greyscale) or tensor ((H, W), (1, H, W) or (1, 1, H, W); bool, uint8 0..255 or float in [0, 1]).
    `size` (height, width) is the image's size: a mask of another size is an error (fit the mask with
    `fit_image(Image.open(path), ...)` the same way as the image)."""
    h, w = _size(size)
    if isinstance(src, Tensor):
        m = src.detach()
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2:
            raise ValueError(f"mask tensor must be (H, W), (1, H, W) or (1, 1, H, W); got shape {tuple(src.shape)}")
        if m.dtype == torch.bool:
            m = m.float()
        elif m.dtype == torch.uint8:
            m = m.float() / 255.0
        else:
            m = m.float()
            if not bool(torch.isfinite(m).all()):
                raise ValueError("mask tensor holds NaN or Inf")
            if m.numel() and (m.min() < 0 or m.max() > 1):
                raise ValueError(f"float mask values must lie in [0, 1]; got [{m.min().item():g}, {m.max().item():g}]")
    else:
        m = _mask_values(open_image(src, "mask"), src)
    if tuple(m.shape) != (h, w):
        raise ValueError(f"mask size {m.shape[0]}x{m.shape[1]} (HxW) differs from the image size {h}x{w}")
    return m.cpu()


def _grey(img: Image.Image) -> Tensor:
    """(H, W) float in [0, 1] from the luminance; 16-bit and 32-bit integer greyscale scaled by 65535."""
    if img.mode in WIDE_GREY:
        i32 = img.convert("I")
        m = torch.frombuffer(bytearray(i32.tobytes()), dtype=torch.int32).view(img.height, img.width)
        return (m.double() / 65535.0).clamp(0, 1).float()
    if img.mode == "F":
        raise ValueError("floating-point mask images are ambiguous; save the mask as 8- or 16-bit greyscale")
    g = img.convert("L")
    return torch.frombuffer(bytearray(g.tobytes()), dtype=torch.uint8).view(g.height, g.width).float() / 255.0


def _mask_values(img: Image.Image, src) -> Tensor:
    """A mask image -> (H, W) in [0, 1]: its grey; its alpha when the grey is uniform and the alpha is not."""
    if img.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA") if img.mode in ("P", "PA") else img
        alpha = _grey(rgba.getchannel("A"))
        grey = _grey(rgba.convert("RGB") if rgba.mode.startswith("RGB") else rgba.getchannel("L"))
        if alpha.min() != alpha.max():
            if grey.min() == grey.max():
                return alpha
            raise ValueError(f"mask {src}: both its grey values and its alpha channel vary, so which one is the "
                             "mask is ambiguous; save it as greyscale (white = subject)")
        return grey
    return _grey(img)


class NumberedPaths(Sequence):
    """The output files of `n` images, NAME.png for one or NAME-0.png ... NAME-{n-1}.png, made on demand: a plan of
    10^6 images costs no memory. Compares equal to the list of the same paths."""

    def __init__(self, out: Path, n: int):
        self.out, self.n = out, n

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"NumberedPaths({str(self.out)!r}, {self.n})"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.out if self.n == 1 else self.out.with_name(f"{self.out.stem}-{i % self.n}{self.out.suffix}")

    def __eq__(self, other) -> bool:
        return isinstance(other, (list, tuple, NumberedPaths)) and len(other) == self.n and list(self) == list(other)

    def taken(self) -> list[Path]:
        """The planned paths that exist now, from one listing of the folder (not one stat per image)."""
        if self.n == 1:
            return [self.out] if os.path.lexists(self.out) else []
        pattern = re.compile(re.escape(self.out.stem) + r"-(0|[1-9][0-9]*)" + re.escape(self.out.suffix))
        try:
            names = os.listdir(self.out.parent if str(self.out.parent) else ".")
        except FileNotFoundError:
            return []
        return [self.out.with_name(name) for name in sorted(names)
                if (m := pattern.fullmatch(name)) and int(m.group(1)) < self.n]


def output_paths(output: str | Path, n: int) -> NumberedPaths | Path:
    """Where `n` images go, decided before any work. A directory (an existing one, or a path ending in '/')
    comes back as a Path: images get numbered names in it (`save_numbered`, never overwriting). Otherwise the
    NumberedPaths of .png files (".png" added when there is no suffix): one image at the path, several as
    NAME-0.png, NAME-1.png, ... Each must be absent or a regular file: a symlink (never written through), a
    directory, a FIFO or device is refused; its folder must be, or be creatable inside, a writable directory."""
    text = os.fspath(output)
    out = Path(text)
    if text.endswith(("/", os.sep)) or out.is_dir():
        if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
            raise ValueError(f"--output {text}: not a directory")
        _check_folder(out, text)
        return out
    if os.path.lexists(out) and (out.is_symlink() or not out.is_file()):  # e.g. /dev/null, a FIFO, a link
        raise ValueError(f"--output {text}: exists and is not a regular file (a symlink, device or FIFO is refused)")
    if out.suffix.lower() not in ("", ".png"):
        raise ValueError(f"--output must be a .png file (the parameters are stored as PNG text), got {text}")
    out = out if out.suffix else out.with_suffix(".png")
    _check_folder(out.parent, text)
    paths = NumberedPaths(out, n)
    for p in paths.taken():
        if p.is_symlink():
            raise ValueError(f"--output {p}: is a symbolic link; refusing to write through or replace it")
        if not p.is_file():
            raise ValueError(f"--output {p}: exists and is not a regular file")
    return paths


def _check_folder(folder: Path, what: str) -> None:
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"--output {what}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"--output {what}: the folder {p} is not writable")


def save_numbered(img: Image.Image, folder: Path, stem: str, pnginfo=None, tag: str = "") -> Path:
    """Save as folder/STEM-NNNN{tag}.png (the CLI's tag: "-sSEED") with the first free number NNNN (claimed
    atomically: never overwrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[len(stem) + 1:len(stem) + 5]) for p in folder.glob(f"{stem}-[0-9][0-9][0-9][0-9]*.png")]
    k = max(taken, default=-1) + 1
    while True:
        try:
            return save_png(img, folder / f"{stem}-{k:04d}{tag}.png", pnginfo, exclusive=True)
        except FileExistsError:
            k += 1


def save_png(img: Image.Image, path: str | Path, pnginfo=None, exclusive: bool = False) -> Path:
    """Write `img` as PNG atomically: a temporary file beside `path`, flushed to disk, then renamed over it
    (`exclusive`: hard-linked into place instead, FileExistsError if the name is taken). An interrupt or crash
    leaves the old file (or none) and at most a hidden temporary file, never a truncated PNG; two writers of one
    path leave one whole image."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=pnginfo)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a saved image gets the usual permissions
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
