"""Images and masks in and out: PIL <-> tensors in [-1, 1], and the sizes FLUX accepts.

    img = load_image("dog.jpg", fit="crop")       # RGB PIL image, both sides multiples of 16
    x = pil_to_tensor(img)                        # (1, 3, H, W) float32 in [-1, 1]
    mask = load_mask("dog_mask.png", x.shape[-2:])  # (H, W) float in [0, 1], white = subject
    tensor_to_pil(ae.decode(z))                   # list of PIL images (clamped and rounded like diffusers)

FLUX needs H and W to be multiples of 16 (the autoencoder's 8x times the transformer's 2x2 patches). By default
a wrong size is an error; `fit="resize"` resizes to the nearest multiples of 16 (Lanczos), `fit="crop"`
center-crops down to them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

MULTIPLE = 16
FITS = ("error", "resize", "crop")


def check_size(h: int, w: int, multiple: int = MULTIPLE) -> None:
    """Raise ValueError naming the size unless both sides are positive multiples of `multiple`."""
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} (HxW) is not a multiple of {multiple}: FLUX needs both sides to be "
                         f"multiples of {multiple}; resize/crop it (load_image(..., fit='resize' or 'crop'))")


def _open(src: str | Path | Image.Image, what: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    with Image.open(path) as im:
        im.load()
        return im.copy()


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
    return fit_image(_open(src, "image").convert("RGB"), size, fit)


def pil_to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, as diffusers' VaeImageProcessor)."""
    img = img.convert("RGB")
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
            if m.numel() and (m.min() < 0 or m.max() > 1):
                raise ValueError(f"float mask values must lie in [0, 1]; got [{m.min().item():g}, {m.max().item():g}]")
    else:
        img = _open(src, "mask").convert("L")
        m = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width).float() / 255.0
    if tuple(m.shape) != (h, w):
        raise ValueError(f"mask size {m.shape[0]}x{m.shape[1]} (HxW) differs from the image size {h}x{w}")
    return m.cpu()
