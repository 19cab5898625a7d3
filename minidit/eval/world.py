"""`--world`: a small DreamBench from the built-in model's procedural world (minidit.weights.world), so the
whole harness runs on a CPU in minutes, with the world's ground truth as extra metrics.

    subjects, cases = world_cases(out, n_subjects=6, n_prompts=4)

A subject is one textured object (shape, colour, texture and its pattern details) drawn on a background: that
render is the "real" reference photo, its object mask the subject mask, its shape the class noun ("a star") and
its description without size and place the FreeCus caption ("a red striped star"; the world's analogue of the
authors' MLLM caption). Its prompts re-draw the subject in new scenes: the same place, each prompt a new
background (flat, gradient, ground under a sky, grid lines) in colours other than the subject's and the
reference's background, named as `quality_methods.shape_prompt` does: "a star on the left, on a blue background" — so
only the reference can give the subject's colour and texture, and the prompt alone decides the background.

Ground-truth metrics of each generated image (the world's detectors, weights/world.py):
- world_background: the detected background colour is the prompt's (prompt fidelity, like CLIP-T);
- world_colour / world_shape: the detected object has the subject's colour / shape (subject fidelity);
- world_psnr: PSNR (dB) inside the reference's subject mask against the reference (the subject in place, as
  Personalize Anything puts it; FreeCus and plain generation may move it, which this row then shows).
The references are written to OUT/world/<subject>/reference.png and mask.png before generation, so every case
points at a real file and any image can be re-made from its PNG metadata.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..weights import world
from ..weights.quality import psnr
from ..weights.quality_methods import shape_prompt
from .cases import Case, Subject

SIZE = 256
SEED = 27_000          # the world's own rng seed for these subjects (not the training or quality scenes' seeds)
KINDS = ("flat", "gradient", "ground", "grid")


def _subject_scene(rng: random.Random) -> world.Scene:
    subject = world.sample_subject(rng)
    while subject.texture == "plain":  # a texture the prompt never names: only the reference can give it
        subject = world.sample_subject(rng)
    placed = world.place(subject, rng.choice(list(world.POSITIONS)), rng.choice(["", "large"]), rng)
    kind, bg, bg2 = world.sample_background(rng, avoid=(subject.colour,))
    return world.Scene((placed,), kind, bg, bg2)


def _new_background(scene: world.Scene, kind: str, rng: random.Random) -> world.Scene:
    free = [c for c in world.COLOURS if c not in (scene.objects[0].subject.colour, scene.bg)]
    bg = rng.choice(free)
    bg2 = rng.choice([c for c in free if c != bg]) if kind in ("ground", "grid") else ""
    return replace(scene, background=kind, bg=bg, bg2=bg2)


def world_cases(out: str | Path, n_subjects: int = 6, n_prompts: int = 4, seed: int = 0,
                limit: int | None = None) -> tuple[list[Subject], list[Case]]:
    """Subjects (with their renders in `.world`) and subject-major cases; nothing is written here."""
    rng = random.Random(SEED + seed)
    subjects, cases = [], []
    for i in range(n_subjects):
        scene = _subject_scene(rng)
        p = scene.objects[0]
        name = f"w{i:02d}_{p.subject.colour}_{p.subject.texture}_{p.subject.shape}"
        folder = Path(out) / "world" / name
        mask = world.object_masks(scene, SIZE)[0] > 0.5
        caption = world.describe(replace(p, size="", position="")).strip()
        s = Subject(name, p.subject.shape, str(folder / "reference.png"), mask=str(folder / "mask.png"),
                    caption=caption, world={"image": world.render(scene, SIZE), "mask": mask,
                                            "colour": p.subject.colour, "shape": p.subject.shape})
        subjects.append(s)
        for j in range(n_prompts):
            target = _new_background(scene, KINDS[j % len(KINDS)], rng)
            cases.append(Case(len(cases), s, j, shape_prompt(target), truth={"background": target.bg}))
    return subjects, cases[:limit] if limit is not None else cases


def write_references(subjects: list[Subject], save) -> None:
    """Each world subject's reference render and mask (0/255 greyscale) through `save(image, path)`."""
    for s in subjects:
        Path(s.reference).parent.mkdir(parents=True, exist_ok=True)
        save(s.world["image"], Path(s.reference))
        save(Image.fromarray(s.world["mask"].astype(np.uint8) * 255), Path(s.mask))


def world_metrics(image: Image.Image, case: Case) -> dict:
    """The ground-truth checks of one generated image (see the module docstring); an image of another size than
    the 256² reference is resized to it (bicubic) first, since the detectors are calibrated at 256²."""
    s = case.subject
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BICUBIC)
    img = np.asarray(image)
    bg = case.truth["background"]
    got = world.detect_object(img, bg)
    return {"world_background": float(world.detect_background(img) == bg),
            "world_colour": float(got is not None and got["colour"] == s.world["colour"]),
            "world_shape": float(got is not None and got["shape"] == s.world["shape"]),
            "world_psnr": float(psnr(img, np.asarray(s.world["image"]), s.world["mask"]))}
