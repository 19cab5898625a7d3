"""A procedural captioned-image world: the training data of the built-in tiny FLUX.1, and its ground truth.

    scene = sample_scene(rng)                   # one or two objects on a background, attributes kept
    image = render(scene, size=256)             # PIL RGB, pure numpy/PIL, deterministic
    masks = object_masks(scene, size=256)       # (n_objects, H, W) float in [0, 1]
    caption(scene, rng)                         # "a red striped star on the left, on a blue background"

A `Subject` is one specific object: shape, colour, texture and the texture's details (stripe angle and period,
dot spacing, check size, phase), which the caption does not say. The pattern is anchored to the object's centre,
so the same subject re-drawn elsewhere looks the same: that is what personalization moves around, and what the
benchmarks (bench/quality.py) measure against. Everything is a pure function of a `random.Random` seed.

The detectors at the bottom read attributes back from any image (generated or rendered): background colour from
the border, the object as the pixels far from it (made solid by `clean_mask`), its colour by nearest palette
colour (or that colour's texture tint), its position from the centroid, its shape by the best IoU against the
shapes rendered into its bounding box.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from minidit.masks import dilate, erode

COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (240, 210, 40),
           "purple": (135, 55, 175), "orange": (245, 135, 25), "white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
TEXTURES = ("plain", "striped", "dotted", "checked")
BACKGROUNDS = ("flat", "gradient", "ground", "grid")
SIZES = {"small": 0.13, "": 0.19, "large": 0.26}            # radius as a fraction of the image side
POSITIONS = {"on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
             "at the bottom": (0.5, 0.72), "in the centre": (0.5, 0.5)}
PAIRS = (("on the left", "on the right"), ("at the top", "at the bottom"))


def tint(colour: str) -> tuple[int, int, int]:
    """The second colour of a textured object: its colour mixed 45 % towards white (black: towards grey)."""
    c = np.array(COLOURS[colour], dtype=np.float64)
    target = 128.0 if colour == "black" else 255.0
    return tuple(int(round(v)) for v in 0.55 * c + 0.45 * target)


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    texture: str = "plain"
    angle: int = 0          # stripes: direction in degrees
    period: float = 0.06    # stripes / dots / checks: pattern scale, fraction of the image side
    phase: float = 0.0      # pattern phase, fraction of the period


@dataclass(frozen=True)
class Placed:
    subject: Subject
    size: str               # a key of SIZES
    position: str           # a key of POSITIONS
    cx: float               # centre, fractions of the image side
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[Placed, ...]
    background: str         # a key of BACKGROUNDS
    bg: str                 # background colour (the sky for "ground")
    bg2: str = ""           # the ground colour (ground), the line colour (grid)


# --------------------------------------------------------------------------------------------- sampling
def sample_subject(rng: random.Random, avoid: tuple[str, ...] = ()) -> Subject:
    colour = rng.choice([c for c in COLOURS if c not in avoid])
    return Subject(rng.choice(SHAPES), colour, rng.choice(TEXTURES), angle=rng.choice((0, 45, 90, 135)),
                   period=rng.uniform(0.045, 0.08), phase=rng.random())


def place(subject: Subject, position: str, size: str, rng: random.Random | None = None) -> Placed:
    """Put a subject at a named position, jittered by up to 4 % of the side when `rng` is given."""
    cx, cy = POSITIONS[position]
    if rng is not None:
        cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    return Placed(subject, size, position, cx, cy)


def sample_background(rng: random.Random, avoid: tuple[str, ...] = ()) -> tuple[str, str, str]:
    kind = rng.choices(BACKGROUNDS, weights=(4, 2, 2, 1))[0]
    free = [c for c in COLOURS if c not in avoid]
    bg = rng.choice(free)
    bg2 = rng.choice([c for c in free if c != bg]) if kind in ("ground", "grid") else ""
    return kind, bg, bg2


def sample_scene(rng: random.Random, n_objects: int | None = None, subjects: tuple[Subject, ...] = ()) -> Scene:
    """One or two objects (or the given subjects) on a background whose colours differ from every object's."""
    n = n_objects or len(subjects) or (1 if rng.random() < 0.7 else 2)
    subs = list(subjects)
    while len(subs) < n:
        subs.append(sample_subject(rng, avoid=tuple(s.colour for s in subs)))
    if n == 1:
        positions = [rng.choice(list(POSITIONS))]
        sizes = [rng.choice(list(SIZES))]
    else:
        positions = list(rng.choice(PAIRS))
        rng.shuffle(positions)
        sizes = [rng.choice(["small", ""]) for _ in range(n)]
    objects = tuple(place(s, p, z, rng) for s, p, z in zip(subs, positions, sizes))
    kind, bg, bg2 = sample_background(rng, avoid=tuple(s.colour for s in subs))
    return Scene(objects, kind, bg, bg2)


# ---------------------------------------------------------------------------------------------- captions
def describe(p: Placed, rng: random.Random | None = None, drop: float = 0.0) -> str:
    """'a small red striped star on the left'; with `drop`, the size, colour and position are each left out with
    that probability (so the model also learns to fill in what a prompt does not say). The texture word is never
    left out: a subject named without one is plain ("a red circle" means a plain one; dropping it made 31 % of
    such training objects textured, a mixture the first built-in model may hedge between: weights/README.md)."""
    keep = (lambda: True) if rng is None or drop == 0 else (lambda: rng.random() >= drop)
    s = p.subject
    words = [p.size if p.size and keep() else "", s.colour if keep() else "",
             s.texture if s.texture != "plain" else "", s.shape]
    text = " ".join(w for w in words if w)
    text = ("an " if text[0] in "aeiou" else "a ") + text
    return text + (" " + p.position if keep() else "")


def describe_background(scene: Scene) -> str:
    a = "an" if scene.bg[0] in "aeiou" else "a"
    if scene.background == "flat":
        return f"on {a} {scene.bg} background"
    if scene.background == "gradient":
        return f"on {a} {scene.bg} gradient"
    if scene.background == "ground":
        return f"on {scene.bg2} ground under {a} {scene.bg} sky"
    return f"on {a} {scene.bg} background with {scene.bg2} grid lines"


def caption(scene: Scene, rng: random.Random | None = None, drop: float = 0.0) -> str:
    """The scene in words. With `rng` and `drop` > 0, attributes (and the background) are left out at random."""
    objs = " and ".join(describe(p, rng, drop) for p in scene.objects)
    if rng is not None and drop > 0 and rng.random() < drop:
        return objs
    return f"{objs}, {describe_background(scene)}"


# --------------------------------------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        a = 0.82 * r
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "diamond":
        return [(cx, cy - 1.1 * r), (cx + 0.8 * r, cy), (cx, cy + 1.1 * r), (cx - 0.8 * r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a))) for a in (90, 210, 330)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(math.radians(90 + 36 * i)),
                 cy - (r if i % 2 == 0 else 0.45 * r) * math.sin(math.radians(90 + 36 * i))) for i in range(10)]
    if shape == "cross":
        a, b = 0.32 * r, 0.95 * r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    return None  # circle


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Anti-aliased (2x supersampled) mask of a shape with centre (cx, cy) and radius r in pixels -> (H, W)."""
    s = 2
    im = Image.new("L", (size * s, size * s), 0)
    d = ImageDraw.Draw(im)
    poly = _polygon(shape, cx * s, cy * s, r * s)
    if poly is None:
        d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(im.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _pattern(subject: Subject, cx: float, cy: float, size: int) -> np.ndarray:
    """(H, W) in {0, 1}: where the texture shows the tint. Anchored at the object's centre (in pixels)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    x, y, p = x - cx, y - cy, subject.period * size
    if subject.texture == "striped":
        a = math.radians(subject.angle)
        u = (x * math.cos(a) + y * math.sin(a)) / p + subject.phase
        return ((u % 1.0) < 0.4).astype(np.float32)
    if subject.texture == "dotted":
        u, v = x / p + subject.phase, y / p + subject.phase
        return (((u % 1.0) - 0.5) ** 2 + ((v % 1.0) - 0.5) ** 2 < 0.3 ** 2).astype(np.float32)
    if subject.texture == "checked":
        u, v = np.floor(x / p + subject.phase), np.floor(y / p + subject.phase)
        return ((u + v) % 2).astype(np.float32)
    return np.zeros((size, size), np.float32)


def _background(scene: Scene, size: int) -> np.ndarray:
    c = np.array(COLOURS[scene.bg], np.float32)
    img = np.broadcast_to(c, (size, size, 3)).copy()
    if scene.background == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        img = img * (1.0 - 0.55 * t)
    elif scene.background == "ground":
        img[int(0.62 * size):] = COLOURS[scene.bg2]
    elif scene.background == "grid":
        step, w = size // 8, max(1, size // 64)
        line = (np.arange(size) % step) < w
        img[line, :] = COLOURS[scene.bg2]
        img[:, line] = COLOURS[scene.bg2]
    return img


def _draw(img: np.ndarray, p: Placed, size: int) -> np.ndarray:
    """Composite one placed subject over `img`; returns its soft mask."""
    cx, cy, r = p.cx * size, p.cy * size, SIZES[p.size] * size
    m = shape_mask(p.subject.shape, cx, cy, r, size)[..., None]
    pat = _pattern(p.subject, cx, cy, size)[..., None]
    colour = np.array(COLOURS[p.subject.colour], np.float32)
    obj = colour * (1 - pat) + np.array(tint(p.subject.colour), np.float32) * pat
    img *= 1 - m
    img += m * obj
    return m[..., 0]


def render(scene: Scene, size: int = 256) -> Image.Image:
    img = _background(scene, size)
    for p in scene.objects:
        _draw(img, p, size)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))


def object_masks(scene: Scene, size: int = 256) -> np.ndarray:
    """(n, H, W) soft masks of the visible part of each object (later objects cover earlier ones)."""
    img = _background(scene, size)
    masks = [_draw(img, p, size) for p in scene.objects]
    for i in range(len(masks)):
        for later in masks[i + 1:]:
            masks[i] = masks[i] * (1 - later)
    return np.stack(masks)


def moved(scene: Scene, index: int, **changes) -> Scene:
    """The scene with object `index` changed (e.g. moved(scene, 0, cx=0.7, position='on the right'))."""
    objs = list(scene.objects)
    objs[index] = replace(objs[index], **changes)
    return replace(scene, objects=tuple(objs))


# --------------------------------------------------------------------------------------------- detectors
_REFS = np.array([COLOURS[c] for c in COLOURS] + [tint(c) for c in COLOURS], np.float32)
_NAMES = list(COLOURS) * 2


def nearest_colour(pixels: np.ndarray, tints: bool = True) -> np.ndarray:
    """(..., 3) RGB -> (...) palette indices (a tint counts as its colour when `tints`)."""
    refs = _REFS if tints else _REFS[:len(COLOURS)]
    d = ((pixels[..., None, :].astype(np.float32) - refs) ** 2).sum(-1)
    return d.argmin(-1) % len(COLOURS)


def detect_background(img: np.ndarray) -> str:
    """The most common palette colour of the outermost 4 % of the image (no tints)."""
    b = max(2, img.shape[0] // 25)
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                             img[:, -b:].reshape(-1, 3)])
    return list(COLOURS)[np.bincount(nearest_colour(border, tints=False), minlength=len(COLOURS)).argmax()]


def foreground(img: np.ndarray, bg: str, threshold: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels further than `threshold` (RGB distance) from the background colour."""
    return np.sqrt(((img.astype(np.float32) - np.array(COLOURS[bg], np.float32)) ** 2).sum(-1)) > threshold


def clean_mask(fg: np.ndarray, speck: int = 2, gap: int = 5) -> np.ndarray:
    """A foreground mask made solid: an opening by `speck` pixels drops specks and thin lines (the tiny
    autoencoder draws a faint frame along the image border, which would otherwise stretch an object's bounding box
    to the whole image), then a closing by `gap` pixels fills a texture's tint where it is close to the
    background; beyond the image is background throughout. Calibrated on autoencoder round trips of training
    renders (shape read right 0.17 -> 0.93 of 80)."""
    m = torch.from_numpy(fg)
    m = dilate(erode(m, 2 * speck + 1, from_border=True), 2 * speck + 1)   # opening
    return erode(dilate(m, 2 * gap + 1), 2 * gap + 1, from_border=True).numpy()  # closing


def detect_object(img: np.ndarray, bg: str | None = None) -> dict | None:
    """Attributes of the single object in `img` (H, W, 3 uint8): colour, position, shape, mask; None if empty."""
    size = img.shape[0]
    bg = bg or detect_background(img)
    raw = foreground(img, bg)
    fg = clean_mask(raw)
    if fg.sum() < 0.004 * size * size:
        return None
    ys, xs = np.nonzero(fg)
    colour = list(COLOURS)[np.bincount(nearest_colour(img[fg & raw]), minlength=len(COLOURS)).argmax()]
    cx, cy = xs.mean() / size, ys.mean() / size
    position = nearest_position(cx, cy)
    shape = detect_shape(fg)
    return {"colour": colour, "position": position, "shape": shape, "mask": fg, "background": bg,
            "centre": (cx, cy)}


def nearest_position(cx: float, cy: float) -> str:
    """The named position whose anchor is nearest (cx, cy) (fractions of the image side)."""
    return min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)


def detect_shape(fg: np.ndarray) -> str:
    """The shape whose rendering into the mask's bounding box overlaps it best (IoU)."""
    size = fg.shape[0]
    ys, xs = np.nonzero(fg)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        # render at radius 100 px on a 256 canvas, crop its own bounding box, fit to the mask's box
        m = shape_mask(shape, 128, 128, 100, 256) > 0.5
        my, mx = np.nonzero(m)
        crop = Image.fromarray((m[my.min():my.max() + 1, mx.min():mx.max() + 1] * 255).astype(np.uint8))
        fit = np.asarray(crop.resize((x1 - x0, y1 - y0), Image.BILINEAR)) > 127
        box = fg[y0:y1, x0:x1]
        iou = (fit & box).sum() / max(1, (fit | box).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best
