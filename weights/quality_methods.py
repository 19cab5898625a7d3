"""What the personalization and editing methods do in the procedural world, measured against its ground truth
(quality.py has the scenes, PSNR, the autoencoder's round trip and the text-to-image measures).

    personalize  subject fidelity: PSNR inside the subject mask against the reference (and against the
                 reference's own autoencoder round trip), method vs plain generation with the same caption; prompt
                 adherence: the new background's colour is the one asked for
    inpaint      PSNR of the preserved region against the input; the new object's colour in the edit region
    outpaint     PSNR of the pasted image; the new border's colour
    freecus      subject fidelity: does the generated object have the reference's colour (the prompt names only
                 its shape) and how close is its aligned crop (PSNR inside the reference mask)

The methods' samplers have no true-CFG branch, so the plain generation they are compared with runs without CFG
too (`true_cfg=1`, said explicitly: quality.cfg_kwargs): like against like.
"""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from . import world
from .quality import EVAL_SEED, SIZE, as_array, cfg_kwargs, eval_scenes, psnr, round_trip


def subject_mask(scene: world.Scene, index: int = 0) -> np.ndarray:
    return world.object_masks(scene, SIZE)[index] > 0.5


def new_background(scene: world.Scene, rng: random.Random) -> world.Scene:
    colours = [c for c in world.COLOURS if c not in (scene.bg, *(p.subject.colour for p in scene.objects))]
    return replace(scene, bg=rng.choice(colours))


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(mask.astype(np.float32))


def _shift(a: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """`a` moved by (dx, dy) pixels (what was at (x, y) is now at (x + dx, y + dy)); the caller keeps the content
    inside the canvas, so nothing that matters wraps around."""
    return np.roll(a, (dy, dx), axis=(0, 1))


def offset_for(p: world.Placed) -> tuple[int, int]:
    """A 16-pixel-aligned move that takes a subject to the other side (centre: to the right)."""
    step = 112
    return {"on the left": (step, 0), "on the right": (-step, 0), "at the top": (0, step),
            "at the bottom": (0, -step), "in the centre": (64, 0)}[p.position]


def moved_scene(scene: world.Scene, dx: int, dy: int) -> world.Scene:
    p = scene.objects[0]
    cx, cy = p.cx + dx / SIZE, p.cy + dy / SIZE
    return world.moved(scene, 0, cx=cx, cy=cy, position=world.nearest_position(cx, cy))


def shape_prompt(scene: world.Scene) -> str:
    """The prompt that names the scene's (first) object by its shape and place only: "a star on the left, on a
    blue background" (FreeCus's rows, and Personalize Anything's with `shape_only`)."""
    q = scene.objects[0]
    return f"a {q.subject.shape} {q.position}, {world.describe_background(scene)}"


def personalize(pipe, n: int = 8, seed: int = 0, mode: str = "in place", steps: int | None = None,
                true_cfg: float = 1.0, shape_only: bool = False, **method) -> dict[str, float]:
    """Personalize Anything against plain generation with the same caption. mode: "in place", "offset" (the
    subject moved to the other side), "multi" (two references, left and right), "scene" (a subject and a scene
    reference). `shape_only` (in place, offset): the prompt names the subject by its shape and place only, as
    FreeCus's rows do ("a star on the left, on a blue background"), so only the reference can give its colour
    and texture. Returns mean PSNR in the subject region(s) for both (`psnr`, `psnr_plain`; `psnr_trip`: the
    method's against the reference's own autoencoder round trip, what its latents can hold at best), and how often
    the background is right. Personalize Anything's Fig. 2 (token replacement at every step reconstructs the
    subject) is `tau=0.0, perturb=False` in place."""
    from minidit.masks import Reference
    rng = random.Random(EVAL_SEED + 500 + seed)
    fid, fid_plain, fid_trip, bg_ok, bg_plain, scene_psnr = [], [], [], [], [], []
    for i, s in enumerate(eval_scenes(n, seed + 1, textured=True)):
        ref_img, mask = world.render(s, SIZE), subject_mask(s)
        refs = [Reference(ref_img, mask_tensor(mask))]
        kw, pairs = {}, [(as_array(ref_img), mask, 0, 0)]
        target = new_background(s, rng)
        if mode == "offset":
            dx, dy = offset_for(s.objects[0])
            target, kw["placement"] = moved_scene(target, dx, dy), (dx, dy)
            pairs = [(as_array(ref_img), mask, dx, dy)]
        elif mode == "multi":
            sa = world.moved(s, 0, cx=0.28, cy=0.5, position="on the left", size="small")
            other = world.sample_subject(rng, avoid=(sa.objects[0].subject.colour, sa.bg))
            sb = replace(sa, objects=(world.place(other, "on the right", "small"),))
            refs, pairs = [], []
            for sc in (sa, sb):
                im, m = world.render(sc, SIZE), subject_mask(sc)
                refs.append(Reference(im, mask_tensor(m)))
                pairs.append((as_array(im), m, 0, 0))
            target = new_background(replace(sa, objects=sa.objects + sb.objects), rng)
        elif mode == "scene":
            backdrop = replace(target, objects=(), background="ground",
                               bg2=rng.choice([c for c in world.COLOURS if c not in (target.bg, s.objects[0].subject.colour)]))
            target = replace(backdrop, objects=s.objects)
            scene_img = world.render(backdrop, SIZE)
            kw["scene"] = Reference(scene_img, None)
        prompt = world.caption(target)
        if shape_only and mode in ("in place", "offset"):
            prompt = shape_prompt(target)
        common = dict(height=SIZE, width=SIZE, steps=steps, seed=seed * 100 + i)
        out = as_array(pipe.personalize(prompt, refs if len(refs) > 1 else refs[0], **kw, **common, **method)[0])
        plain = as_array(pipe.generate(prompt, **common, **cfg_kwargs(pipe, true_cfg))[0])
        for im, m, dx, dy in pairs:
            fid.append(psnr(_shift(out, -dx, -dy), im, m))
            fid_plain.append(psnr(_shift(plain, -dx, -dy), im, m))
            fid_trip.append(psnr(_shift(out, -dx, -dy), as_array(round_trip(pipe, Image.fromarray(im))), m))
        bg_ok.append(world.detect_background(out) == target.bg)
        bg_plain.append(world.detect_background(plain) == target.bg)
        if mode == "scene":
            keep = ~np.any([_shift(m, dx, dy) for _, m, dx, dy in pairs], axis=0)
            scene_psnr.append(psnr(out, as_array(scene_img), keep))
    res = {"psnr": float(np.mean(fid)), "psnr_plain": float(np.mean(fid_plain)),
           "psnr_trip": float(np.mean(fid_trip)),
           "background": float(np.mean(bg_ok)), "background_plain": float(np.mean(bg_plain))}
    if mode == "scene":
        res.update(scene_psnr=float(np.mean(scene_psnr)))
        res.pop("background"), res.pop("background_plain")
    return res


def inpaint(pipe, n: int = 8, seed: int = 0, steps: int | None = None, **method) -> dict[str, float]:
    """Repaint the box around the object with a new object of another colour (same shape and place): PSNR of
    everything outside the box against the input, and how often the new region has the asked colour."""
    rng = random.Random(EVAL_SEED + 700 + seed)
    keep_psnr, colour_ok = [], []
    for i, s in enumerate(eval_scenes(n, seed + 2)):
        image = world.render(s, SIZE)
        p = s.objects[0]
        r = world.SIZES[p.size] * SIZE * 1.2
        x0, y0 = int(max(0, p.cx * SIZE - r)) // 16 * 16, int(max(0, p.cy * SIZE - r)) // 16 * 16
        x1, y1 = min(SIZE, -(-int(p.cx * SIZE + r) // 16) * 16), min(SIZE, -(-int(p.cy * SIZE + r) // 16) * 16)
        colour = rng.choice([c for c in world.COLOURS if c not in (s.bg, p.subject.colour)])
        target = world.moved(s, 0, subject=replace(p.subject, colour=colour))
        out = as_array(pipe.inpaint(image, (x0, y0, x1 - x0, y1 - y0), world.caption(target), steps=steps,
                                    seed=seed * 100 + i, **method)[0])
        keep = np.ones((SIZE, SIZE), bool)
        keep[y0:y1, x0:x1] = False
        keep_psnr.append(psnr(out, as_array(image), keep))
        region = out[y0:y1, x0:x1]
        fg = world.foreground(region, s.bg)
        got = list(world.COLOURS)[np.bincount(world.nearest_colour(region[fg]), minlength=8).argmax()] if fg.sum() else None
        colour_ok.append(got == colour)
    return {"psnr_kept": float(np.mean(keep_psnr)), "colour": float(np.mean(colour_ok))}


def outpaint(pipe, n: int = 8, seed: int = 0, steps: int | None = None, **method) -> dict[str, float]:
    """Extend the centre 128x128 crop of a scene (its object in the middle) to 256x256: PSNR of the pasted crop,
    and how often the new border has the background colour the prompt asks for."""
    keep_psnr, bg_ok = [], []
    for i, s in enumerate(eval_scenes(n, seed + 3)):
        s = world.moved(s, 0, cx=0.5, cy=0.5, position="in the centre", size="small")
        full = as_array(world.render(s, SIZE))
        crop = full[64:192, 64:192]
        out = as_array(pipe.outpaint(Image.fromarray(crop), world.caption(s), (SIZE, SIZE), steps=steps,
                                     seed=seed * 100 + i, **method)[0])
        keep_psnr.append(psnr(out[64:192, 64:192], crop))
        bg_ok.append(world.detect_background(out) == s.bg)
    return {"psnr_kept": float(np.mean(keep_psnr)), "background": float(np.mean(bg_ok))}


def _aligned_psnr(out: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray, bg: str) -> float:
    """PSNR of the generated object's bounding-box crop, resized onto the reference object's box, inside the
    reference mask (0 dB-ish when nothing was generated)."""
    fg = world.clean_mask(world.foreground(out, bg))
    if fg.sum() < 50:
        return psnr(np.zeros_like(ref), ref, ref_mask)
    ys, xs = np.nonzero(fg)
    ry, rx = np.nonzero(ref_mask)
    crop = Image.fromarray(out[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    h, w = ry.max() + 1 - ry.min(), rx.max() + 1 - rx.min()
    fit = np.asarray(crop.resize((w, h), Image.BILINEAR))
    return psnr(fit, ref[ry.min():ry.max() + 1, rx.min():rx.max() + 1],
                ref_mask[ry.min():ry.max() + 1, rx.min():rx.max() + 1])


def freecus(pipe, n: int = 8, seed: int = 0, steps: int | None = None, caption: bool = True, plain: bool = False,
            true_cfg: float = 1.0, **method) -> dict[str, float]:
    """FreeCus (or, with `plain`, plain generation of the same prompt): the reference subject moved to the other
    side on a new background, the prompt naming only its shape (and, with `caption`, the subject's description
    appended as FreeCus does). Returns how often the object has the reference's colour, the aligned PSNR, and
    how often the background is the asked one."""
    from minidit.masks import Reference
    rng = random.Random(EVAL_SEED + 900 + seed)
    colour_ok, fid, bg_ok = [], [], []
    for i, s in enumerate(eval_scenes(n, seed + 4)):
        ref_img, mask = world.render(s, SIZE), subject_mask(s)
        p = s.objects[0]
        dx, dy = offset_for(p)
        target = new_background(moved_scene(s, dx, dy), rng)
        prompt = shape_prompt(target)
        cap = world.describe(replace(p, size="", position="")).strip() if caption else None
        common = dict(height=SIZE, width=SIZE, steps=steps, seed=seed * 100 + i)
        if plain:
            from minidit.freecus import with_caption
            out = pipe.generate(with_caption(prompt, cap), **common, **cfg_kwargs(pipe, true_cfg))[0]
        else:
            out = pipe.freecus(prompt, Reference(ref_img, mask_tensor(mask), None), caption=cap, **common, **method)[0]
        out = as_array(out)
        got = world.detect_object(out, target.bg)
        colour_ok.append(got is not None and got["colour"] == p.subject.colour)
        fid.append(_aligned_psnr(out, as_array(ref_img), mask, target.bg))
        bg_ok.append(world.detect_background(out) == target.bg)
    return {"colour": float(np.mean(colour_ok)), "psnr_aligned": float(np.mean(fid)),
            "background": float(np.mean(bg_ok))}
