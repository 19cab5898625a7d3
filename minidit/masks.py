"""Subject masks on the token grid (pure functions) and the `Reference` a personalization method takes.

A FLUX image token covers a 16x16 pixel patch (8x VAE downsampling, then 2x2 packing). A pixel mask (white =
subject) becomes a token mask by area: a token belongs to the subject when at least `threshold` (default 0.5)
of its 16x16 patch is subject.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .image import check_size, load_mask, open_image, pil_to_tensor
from .validate import integer, pixels

PATCH = 16  # pixels per token side
THRESHOLD = 0.5


@dataclass
class Reference:
    """A subject to personalize with: an image (path, PIL or (3, H, W) tensor in [-1, 1]), its subject mask
    (path, PIL, (H, W) tensor in [0, 1], or a box (x, y, w, h) in pixels as shorthand; None = the whole image),
    and the prompt describing the reference image (None = the method's default)."""
    image: object
    mask: object = None
    prompt: str | None = None


def box_mask(box: tuple[int, int, int, int], height: int, width: int) -> Tensor:
    """(x, y, w, h) pixel box -> (H, W) float mask. Errors if the box is empty or leaves the canvas."""
    x, y, w, h = (integer(f"box {box} {name}", v) for name, v in zip("xywh", box))  # 2.5 px is a mistake
    if w <= 0 or h <= 0:
        raise ValueError(f"box {box} is empty (w and h must be > 0)")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise ValueError(f"box {box} (x, y, w, h) lies outside the {width}x{height} canvas")
    m = torch.zeros(height, width)
    m[y:y + h, x:x + w] = 1.0
    return m


def token_mask(mask: Tensor, threshold: float = THRESHOLD) -> Tensor:
    """(H, W) pixel mask in [0, 1] -> (H/16, W/16) bool token mask by area (average over each 16x16 patch)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    H, W = mask.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"mask size {W}x{H} is not a multiple of {PATCH}")
    area = F.avg_pool2d(mask.float()[None, None], PATCH)[0, 0]
    return area >= threshold


TOKEN_RULES = ("area", "center", "bilinear")


def token_mask_center(mask: Tensor) -> Tensor:
    """Personalize Anything's released rule (src/utils.py `create_mask`): the mask PNG is resized to the token
    grid with PIL NEAREST, which samples pixel (16·r + 8, 16·c + 8) of each 16x16 patch, and a token is set
    when that pixel is exactly white (== 255). Here: the pixel's value in [0, 1] rounds to 255 in 8 bits."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    H, W = mask.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"mask size {W}x{H} is not a multiple of {PATCH}")
    return mask.float()[PATCH // 2::PATCH, PATCH // 2::PATCH] >= 254.5 / 255


def token_mask_bilinear(mask: Tensor) -> Tensor:
    """FreeCus' released rule (infer.py): the mask is bilinearly resized to the token grid
    (`F.interpolate(..., mode="bilinear")`, align_corners=False, no antialiasing: each token reads the 2x2
    pixels at the centre of its patch) and a token is subject when the result is > 0."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {tuple(mask.shape)}")
    H, W = mask.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"mask size {W}x{H} is not a multiple of {PATCH}")
    return F.interpolate(mask.float()[None, None], size=(H // PATCH, W // PATCH), mode="bilinear",
                         align_corners=False)[0, 0] > 0


def token_mask_rule(mask: Tensor, rule: str = "area", threshold: float = THRESHOLD) -> Tensor:
    """(H, W) pixel mask -> (H/16, W/16) bool tokens by `rule`: "area" (`token_mask` with `threshold`),
    "center" (`token_mask_center`) or "bilinear" (`token_mask_bilinear`)."""
    if rule == "area":
        return token_mask(mask, threshold)
    if rule == "center":
        return token_mask_center(mask)
    if rule == "bilinear":
        return token_mask_bilinear(mask)
    raise ValueError(f"mask rule must be one of {TOKEN_RULES}, got {rule!r}")


def token_indices(tokens: Tensor) -> Tensor:
    """(h, w) bool token mask -> flat indices (row-major, like the packed latent) of the True tokens."""
    return tokens.flatten().nonzero().flatten()


def require_nonempty(tokens: Tensor, what: str = "mask") -> Tensor:
    if not tokens.any():
        raise ValueError(f"{what} is empty: no 16x16 token is at least {THRESHOLD:.0%} covered "
                         "(white = subject); draw a larger region or lower the threshold")
    return tokens


# ------------------------------------------------------- layout and patch perturbation (Personalize Anything)
# All on the (h, w) bool token grid, pure, and seeded through an explicit torch.Generator.

def pixels_to_tokens(value: int, what: str = "offset") -> int:
    """A pixel distance -> tokens. Must be a multiple of 16 (a token is a 16x16 patch), else a clear error."""
    value = integer(what, value)
    if value % PATCH:
        raise ValueError(f"{what} {value} px is not a multiple of {PATCH} px (one token); "
                         f"round it to a multiple of {PATCH}")
    return value // PATCH


def translate(tokens: Tensor, dy: int, dx: int) -> Tensor:
    """Move a (h, w) token mask by (dy, dx) tokens. Errors if a masked token would leave the grid."""
    h, w = tokens.shape
    rows, cols = tokens.nonzero(as_tuple=True)
    if rows.numel() and (rows.min() + dy < 0 or cols.min() + dx < 0 or rows.max() + dy >= h or cols.max() + dx >= w):
        raise ValueError(f"placing the subject by ({dx * PATCH}, {dy * PATCH}) px (x, y) moves it outside the "
                         f"{w * PATCH}x{h * PATCH} canvas")
    out = torch.zeros_like(tokens)
    out[rows + dy, cols + dx] = True
    return out


def bbox(tokens: Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the True tokens, bottom/right exclusive."""
    rows, cols = require_nonempty(tokens).nonzero(as_tuple=True)
    return int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1


def box_offset(tokens: Tensor, box: tuple[int, int, int, int]) -> tuple[int, int]:
    """Translation (dy, dx) in tokens that centres the subject's bounding box in the pixel box (x, y, w, h)
    (rounded down to whole tokens). Translation does not scale: errors if the subject is larger than the box."""
    h, w = tokens.shape
    box_mask(box, h * PATCH, w * PATCH)  # validates the box against the canvas
    x, y, bw, bh = (int(v) for v in box)
    top, left, bottom, right = bbox(tokens)
    if (bottom - top) * PATCH > bh or (right - left) * PATCH > bw:
        raise ValueError(f"the subject ({(right - left) * PATCH}x{(bottom - top) * PATCH} px) does not fit in the "
                         f"target box {box} (x, y, w, h): placement only translates; resize the reference instead")
    cy2, cx2 = 2 * y + bh, 2 * x + bw                      # twice the box centre, in pixels
    dy = (cy2 - (top + bottom) * PATCH) // (2 * PATCH)
    dx = (cx2 - (left + right) * PATCH) // (2 * PATCH)
    return int(dy), int(dx)


def dilate(tokens: Tensor, kernel: int = 5) -> Tensor:
    """Binary dilation with a kernel x kernel square (tokens outside the grid count as background)."""
    return F.max_pool2d(tokens.float()[None, None], kernel, stride=1, padding=kernel // 2)[0, 0] > 0


def erode(tokens: Tensor, kernel: int = 5, from_border: bool = False) -> Tensor:
    """Binary erosion with a kernel x kernel square. Tokens outside the grid are ignored (max-pool padding), so a
    subject touching the border is not eaten from that side; with `from_border` they count as background."""
    inv = (~tokens).float()[None, None]
    if from_border:
        return ~(F.max_pool2d(F.pad(inv, (kernel // 2,) * 4, value=1.0), kernel, stride=1)[0, 0] > 0)
    return ~(F.max_pool2d(inv, kernel, stride=1, padding=kernel // 2)[0, 0] > 0)


def augment_mask(tokens: Tensor, generator: torch.Generator, kernel: int = 5) -> tuple[Tensor, str]:
    """Mask augmentation: dilation or erosion (a fair coin from `generator`) with a kernel x kernel square.
    If erosion would leave nothing (a subject thinner than the kernel) the mask is kept.
    -> (mask, "dilate" | "erode" | "keep")."""
    if torch.randint(2, (1,), generator=generator).item() == 0:
        return dilate(tokens, kernel), "dilate"
    out = erode(tokens, kernel)
    return (out, "erode") if out.any() else (tokens, "keep")


def local_shuffle(tokens: Tensor, generator: torch.Generator, window: int = 3) -> Tensor:
    """Random local shuffle inside non-overlapping window x window blocks of the token grid.

    Returns `perm` (h*w,) long with perm[p] = the flat index whose token moves to position p: inside every block the
    masked positions are permuted among themselves (a bijection, so the multiset of tokens is kept), every other
    position maps to itself. Apply as `src = perm[src]`."""
    h, w = tokens.shape
    flat = tokens.flatten()
    idx = flat.nonzero().flatten()                                        # masked positions, row-major
    rows, cols = idx // w, idx % w
    block = (rows // window) * ((w + window - 1) // window) + cols // window
    keys = torch.rand(idx.numel(), generator=generator, dtype=torch.float64)
    by_block = idx[torch.argsort(block, stable=True)]                     # positions, grouped by block, in order
    shuffled = idx[torch.argsort(block.double() * 2 + keys)]              # same groups, random order inside
    perm = torch.arange(h * w)
    perm[by_block] = shuffled
    return perm


# ------------------------------------------------------------------------------- reading a Reference's inputs

def image_tensor(image) -> Tensor:
    """Path, PIL or (3, H, W) tensor in [-1, 1] -> (3, H, W) float tensor in [-1, 1], at its own size."""
    if isinstance(image, Tensor):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) in [-1, 1], got shape {tuple(image.shape)}")
        return pixels("image tensor", image).detach().float().cpu()  # finite, float, in [-1, 1], not meta
    return pil_to_tensor(open_image(image, "image"))[0]  # to_rgb: 16-bit grey scaled, EXIF applied by open_image


def resize_image(x: Tensor, H: int, W: int) -> Tensor:
    """(3, h, w) -> (3, H, W) (antialiased bilinear); H and W must be multiples of 16."""
    check_size(H, W)
    if tuple(x.shape[1:]) == (H, W):
        return x
    return F.interpolate(x[None], size=(H, W), mode="bilinear", align_corners=False, antialias=True)[0].clamp(-1, 1)


def pixel_mask(mask, height: int, width: int, what: str = "mask") -> Tensor:
    """A mask given as path / PIL / (H, W) tensor in [0, 1] / (x, y, w, h) pixel box / None (everything)
    -> (H, W) float. A mask image must have the size of its image."""
    if mask is None:
        return torch.ones(height, width)
    if isinstance(mask, (tuple, list)):
        if len(mask) != 4:
            raise ValueError(f"a box {what} must be (x, y, w, h) in pixels, got {mask}")
        return box_mask(tuple(mask), height, width)
    try:
        return load_mask(mask, (height, width))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def load_reference(ref: Reference, height: int | None = None, width: int | None = None,
                   what: str = "reference") -> tuple[Tensor, Tensor]:
    """-> (image (3, H, W) in [-1, 1], pixel mask (H, W) in [0, 1]) at height x width (default: the image's own
    size). The mask is checked at the image's own size; if the target size differs, both are resized to it
    (both papers' code resizes the reference to the target size)."""
    if not isinstance(ref, Reference):
        raise TypeError(f"{what} must be a minidit.masks.Reference(image, mask=None, prompt=None), "
                        f"got {type(ref).__name__}")
    x = image_tensor(ref.image)
    H0, W0 = x.shape[1:]
    m = pixel_mask(ref.mask, H0, W0, f"{what}'s mask")
    H, W = height or H0, width or W0
    if H % PATCH or W % PATCH or H <= 0 or W <= 0:
        raise ValueError(f"the output size {W}x{H} (WxH) is not a multiple of {PATCH}"
                         + ("" if (height and width) else ": pass height and width (the reference is resized)"))
    x = resize_image(x, H, W)
    if (H, W) != (H0, W0):
        m = F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return x, m
