"""Token geometry of Personalize Anything: which reference token goes to which target token.

A `Region` pairs the reference's subject tokens `src` (flat indices on its own grid, row-major like the packed
latent) with the target tokens `dst` they are written to. Layout control is a translation of the token mask
(`placement_offset`: a pixel offset or the offset that centres the subject in a target box); patch perturbation
(`plan_regions(perturb=True)`) first dilates or erodes the subject mask (5x5) and then shuffles which subject token
goes where inside 3x3 windows (masks.augment_mask, masks.local_shuffle). Editing keeps tokens in place
(`keep_tokens`), and outpainting pastes the image on a larger canvas first (`outpaint_canvas`). All pure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import validate
from .masks import (PATCH, augment_mask, box_offset, local_shuffle, pixels_to_tokens, require_nonempty, token_indices,
                    token_mask, token_mask_rule, translate)
from .presets import check_choice

SHUFFLE_WINDOW = 3     # patch perturbation: shuffle inside 3x3 token windows
MORPH_KERNEL = 5       # patch perturbation: 5x5 dilation or erosion of the subject mask
PASTES = ("fit", "clip")


@dataclass
class Region:
    """Reference token `src[k]` (its own grid) is written to target token `dst[k]`."""
    src: Tensor  # (K,) long
    dst: Tensor  # (K,) long
    mask_op: str = "none"   # the perturbation's mask augmentation: "dilate" | "erode" | "keep" | "none"


def plan_regions(masks: list[Tensor], offsets: list[tuple[int, int]], perturb: bool = False,
                 generator: torch.Generator | None = None, scene: Tensor | None = None) -> list[Region]:
    """Token masks (h, w) of the references + their translations (dy, dx) in tokens -> one Region per reference
    (then one for the scene, kept in place on its mask minus the subjects' regions).

    Errors on an empty mask, a subject moved off the canvas and overlapping target regions. With `perturb`, each
    subject mask is dilated or eroded (5x5) — never onto another subject's region or off the canvas — and its
    tokens shuffled inside 3x3 windows, all from `generator`."""
    if not masks:
        raise ValueError("need at least one reference")
    h, w = masks[0].shape
    targets = []
    for r, (m, (dy, dx)) in enumerate(zip(masks, offsets)):
        if m.shape != (h, w):
            raise ValueError(f"reference {r}'s token mask is {tuple(m.shape)}, expected {(h, w)}")
        require_nonempty(m, f"reference {r}'s subject mask")
        targets.append(translate(m, dy, dx))
    for a in range(len(targets)):
        for b in range(a + 1, len(targets)):
            if (targets[a] & targets[b]).any():
                raise ValueError(f"the target regions of references {a} and {b} overlap "
                                 f"({int((targets[a] & targets[b]).sum())} tokens): multi-subject regions must be "
                                 "disjoint; move one of them (placement) or shrink a mask")
    regions = []
    for r, (m, (dy, dx)) in enumerate(zip(masks, offsets)):
        op = "none"
        if perturb:
            if generator is None:
                raise ValueError("perturbation needs a seeded torch.Generator")
            aug, op = augment_mask(m, generator, MORPH_KERNEL)
            others = torch.zeros_like(m)
            for o, t in enumerate(targets):
                if o != r:
                    others |= t
            allowed = shift_back(~others, dy, dx)          # sources whose target is on the canvas and free
            aug = aug & allowed
            m = aug if aug.any() else m
        src = token_indices(m)
        dst = src + dy * w + dx
        if perturb:
            src = local_shuffle(m, generator, SHUFFLE_WINDOW)[src]
        regions.append(Region(src, dst, op))
    if scene is not None:
        taken = torch.zeros(h * w, dtype=torch.bool)
        for reg in regions:
            taken[reg.dst] = True
        rest = scene.flatten() & ~taken
        if not rest.any():
            raise ValueError("the scene region is empty: the subjects cover all of the scene mask")
        idx = rest.nonzero().flatten()
        regions.append(Region(idx, idx.clone()))
    return regions


def shift_back(allowed_dst: Tensor, dy: int, dx: int) -> Tensor:
    """Source tokens p whose translate(p, dy, dx) lands on the grid and on an allowed target token."""
    h, w = allowed_dst.shape
    out = torch.zeros_like(allowed_dst)
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = allowed_dst[r0 + dy:r1 + dy, c0 + dx:c1 + dx]
    return out


def copy_tokens(x: Tensor, n: int, regions: list[Region]) -> Tensor:
    """Latent blend: every target's tokens at dst <- reference r's tokens at src."""
    x = x.clone()
    for r, reg in enumerate(regions):
        x[n:, reg.dst] = x[r:r + 1, reg.src]
    return x


def placement_offset(placement, tokens: Tensor, r: int) -> tuple[int, int]:
    """None -> (0, 0); (dx, dy) pixel offset; (x, y, w, h) pixel target box -> (dy, dx) in tokens."""
    if placement is None:
        return 0, 0
    p = tuple(placement)
    if len(p) == 2:
        return pixels_to_tokens(p[1], f"reference {r}'s y offset"), pixels_to_tokens(p[0], f"reference {r}'s x offset")
    if len(p) == 4:
        return box_offset(tokens, p)
    raise ValueError(f"placement of reference {r} must be None, an offset (dx, dy) or a target box (x, y, w, h) in "
                     f"pixels, got {placement}")


def outpaint_canvas(image: Tensor, canvas: tuple[int, int], offset: tuple[int, int] | None = None,
                    paste: str = "fit") -> tuple[Tensor, Tensor]:
    """(3, h, w) image -> (the (3, H, W) black canvas with the image pasted at offset (x, y), the (H, W) pixel mask
    of the pasted area). Default offset: centred, rounded down to 16 px. paste="fit": the whole image must lie
    on the canvas; "clip" (gradio_demo.py `predict_outpainting_mask`): any offset, what leaves the canvas is
    cropped (error if nothing is left)."""
    h, w = image.shape[1:]
    H, W, ox, oy, (x0, y0, x1, y1) = paste_box(h, w, canvas, offset, paste)
    full = torch.full((3, H, W), -1.0)  # black, as their Image.new("RGB", ..., (0, 0, 0))
    full[:, y0:y1, x0:x1] = image[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    area = torch.zeros(H, W)
    area[y0:y1, x0:x1] = 1.0
    return full, area


def paste_box(h: int, w: int, canvas: tuple[int, int], offset: tuple[int, int] | None = None,
              paste: str = "fit") -> tuple[int, int, int, int, tuple[int, int, int, int]]:
    """Where an h x w image goes on the (W, H) canvas (outpaint_canvas's rules; the CLI checks them before any
    model loads): -> (H, W, ox, oy, (x0, y0, x1, y1) the pasted area on the canvas)."""
    check_choice("paste", paste, PASTES)
    if len(canvas) != 2:
        raise ValueError(f"canvas must be (width, height) in pixels, got {canvas!r}")
    H, W = validate.image_size(canvas[1], canvas[0], what="canvas ")  # the canvas; the image may have any size
    if offset is None:
        offset = ((W - w) // 2 // PATCH * PATCH, (H - h) // 2 // PATCH * PATCH)
    if len(offset) != 2:
        raise ValueError(f"offset must be (x, y) in pixels, got {offset!r}")
    ox, oy = (validate.integer(f"offset {name}", v, -validate.MAX_SIDE, validate.MAX_SIDE)
              for name, v in zip("xy", offset))
    if paste == "fit" and (ox < 0 or oy < 0 or ox + w > W or oy + h > H):
        raise ValueError(f"the {w}x{h} image at offset ({ox}, {oy}) does not fit on the {W}x{H} canvas")
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + w, W), min(oy + h, H)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the {w}x{h} image at offset ({ox}, {oy}) lies entirely off the {W}x{H} canvas")
    return H, W, ox, oy, (x0, y0, x1, y1)


def keep_tokens(preserved: Tensor, rule: str = "area") -> Tensor:
    """(H, W) preserved-pixel mask (1 = keep) -> the preserved tokens: "area" keeps a token whose whole 16x16
    patch is preserved; "center" one whose centre pixel (16·r + 8, 16·c + 8) is (the released create_mask)."""
    return token_mask(preserved, threshold=1.0) if rule == "area" else token_mask_rule(preserved, rule)
