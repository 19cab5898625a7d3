"""The cases of a DreamBench evaluation: subjects (a real reference image, its class noun, mask and caption) and
prompts, each with its seeds.

    subjects, prompts = read_dreambench("dreambench/")       # the DreamBooth dataset's layout
    subjects = with_masks(subjects, masks="masks/")          # or box=(x, y, w, h), or the whole image
    subjects = with_captions(subjects, "captions.json")      # FreeCus's subject captions (default "a <class>")
    cases = make_cases(subjects, prompts, seeds=[0])          # subject-major order: one subject's prompts together

The DreamBench layout (google/dreambooth `dataset/`): one folder of photos per subject and
`prompts_and_classes.txt`, which lists `subject_name,class` under "Classes" and two prompt lists written as
Python, `'a {0} {1} in the jungle'.format(unique_token, class_token),`, under "Object Prompts" and
"Live Subject Prompts". The live subjects are the dogs and cats (classes "dog" and "cat", as in DreamBooth's
evaluation: 9 of 30); the others take the object prompts. The papers evaluate training-free methods without a
rare unique token, so `unique_token` is "" by default and the prompt is "a dog in the jungle" (double spaces
collapsed); CLIP-T reads the same prompt. A subject's reference is its first photo (sorted by name; this
collection has one per subject, the real dataset several). 30 subjects x 25 prompts = the papers' 750 cases.

Everything here is checked before any model loads; every problem is a one-line ValueError naming the file or
option. Subject names come from a file someone else wrote: each must be a plain folder name inside the given
folder (nothing outside it is read).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from ..files import read_text
from ..loading import plain_name

LIVE_CLASSES = ("dog", "cat")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")
MAX_TEXT_BYTES = 1 << 20


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    reference: str                     # the real image's path
    live: bool = False
    mask: str | tuple | None = None    # a mask file, an (x, y, w, h) box, or None (the whole image)
    caption: str | None = None         # FreeCus's subject caption; None: "a <class noun>"
    world: dict | None = None          # --world: the ground truth the detectors compare with

    @property
    def subject_caption(self) -> str:
        return self.caption if self.caption is not None else f"a {self.class_noun}"

    @property
    def mask_record(self) -> str:
        if self.mask is None:
            return "whole image"
        return ",".join(map(str, self.mask)) if isinstance(self.mask, tuple) else str(self.mask)


@dataclass(frozen=True)
class Case:
    """One subject x prompt; each case is generated once per seed and per method row."""
    index: int                         # position in the full case list (--limit keeps the first N)
    subject: Subject
    prompt_index: int
    prompt: str
    truth: dict | None = None          # --world: what the prompt asks for (the detectors' ground truth)


def parse_prompts_and_classes(text: str, where: str) -> tuple[dict[str, str], list[str], list[str]]:
    """prompts_and_classes.txt -> ({subject: class}, object templates, live templates); templates keep
    `{0}` (unique token) and `{1}` (class noun)."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in text.splitlines():
        s = line.strip()
        low = s.lower()
        if low == "classes":
            section = "classes"
        elif low == "object prompts":
            section = "object"
        elif low == "live subject prompts":
            section = "live"
        elif section == "classes" and "," in s and low != "subject_name,class":
            name, cls = (x.strip() for x in s.split(",", 1))
            if not name or not cls:
                raise ValueError(f"{where}: bad class line {s!r} (expected subject_name,class)")
            if name in classes:
                raise ValueError(f"{where}: subject {name!r} is listed twice")
            classes[name] = cls
        elif section in lists and (m := PROMPT_LINE.match(line)):
            lists[section].append(m.group(2))
    if not classes:
        raise ValueError(f"{where}: no 'subject_name,class' lines under 'Classes'")
    for kind, prompts in lists.items():
        if not prompts:
            raise ValueError(f"{where}: no {kind} prompts ('...'.format(unique_token, class_token) lines)")
        for p in prompts:
            try:
                p.format("", "x")
            except (IndexError, KeyError, ValueError):
                raise ValueError(f"{where}: prompt {p!r} is not a template of {{0}} and {{1}}") from None
    return classes, lists["object"], lists["live"]


def render_prompt(template: str, class_noun: str, unique_token: str = "") -> str:
    return " ".join(template.format(unique_token, class_noun).split())


def read_dreambench(folder: str | Path, subjects: list[str] | None = None) -> tuple[list[Subject], dict[str, list[str]]]:
    """The subjects (in the file's order, or `subjects`' order) and the templates {"object": [...], "live": [...]}."""
    folder = Path(folder)
    flag = "--dreambench"
    if not folder.is_dir():
        raise ValueError(f"{flag} {folder}: not a folder")
    file = folder / "prompts_and_classes.txt"
    classes, objects, live = parse_prompts_and_classes(read_text(file, flag, MAX_TEXT_BYTES, ValueError), f"{flag} {file}")
    names = list(classes)
    if subjects:
        unknown = [s for s in subjects if s not in classes]
        if unknown:
            raise ValueError(f"--subjects: {', '.join(unknown)} not in {file} (subjects: {', '.join(names)})")
        names = list(subjects)
    root = folder.resolve()
    out = []
    for name in names:
        try:
            plain_name(name, file)
        except ValueError as e:
            raise ValueError(str(e)) from None
        sub = folder / name
        if not sub.is_dir():
            raise ValueError(f"{flag} {folder}: the subject folder {name!r} listed in {file.name} is missing")
        if root not in sub.resolve().parents:
            raise ValueError(f"{flag} {folder}: {name!r} leads outside the folder (a link); refused")
        photos = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not photos:
            raise ValueError(f"{flag} {sub}: no reference image ({', '.join(IMAGE_SUFFIXES)})")
        cls = classes[name]
        out.append(Subject(name, cls, str(photos[0]), live=cls in LIVE_CLASSES))
    return out, {"object": objects, "live": live}


def image_size(path: str, flag: str) -> tuple[int, int]:
    """(width, height) from the file header (no decoding)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: not a readable image ({e})") from None


def parse_box(text: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= 0 or box[3] <= 0 or min(box[:2]) < 0:
        raise ValueError(f"--box must be x,y,w,h in pixels with w, h > 0, got {text!r}")
    return box


def with_masks(subjects: list[Subject], masks: str | Path | None = None, box: tuple | None = None) -> list[Subject]:
    """Each subject's mask: `masks/<subject>.png` or `masks/<subject>/<reference stem>.png` (white = subject, the
    reference's size), or the same pixel box for all, or None (the whole image)."""
    if masks is not None and box is not None:
        raise ValueError("give --masks or --box, not both")
    out = []
    for s in subjects:
        w, h = image_size(s.reference, "--dreambench")
        if box is not None:
            if box[0] + box[2] > w or box[1] + box[3] > h:
                raise ValueError(f"--box {','.join(map(str, box))} leaves the {w}x{h} reference of {s.name!r}")
            out.append(replace(s, mask=tuple(box)))
            continue
        if masks is None:
            out.append(s)
            continue
        folder = Path(masks)
        if not folder.is_dir():
            raise ValueError(f"--masks {folder}: not a folder")
        found = [p for p in (folder / f"{s.name}.png", folder / s.name / f"{Path(s.reference).stem}.png") if p.is_file()]
        if not found:
            raise ValueError(f"--masks {folder}: no mask for {s.name!r} ({s.name}.png or {s.name}/"
                             f"{Path(s.reference).stem}.png)")
        mw, mh = image_size(str(found[0]), "--masks")
        if (mw, mh) != (w, h):
            raise ValueError(f"--masks {found[0]}: {mw}x{mh}, but the reference {s.reference} is {w}x{h} "
                             "(a mask must have its reference's size)")
        out.append(replace(s, mask=str(found[0])))
    return out


def with_captions(subjects: list[Subject], file: str | Path | None) -> list[Subject]:
    """FreeCus captions from a JSON object {subject: caption} (.json) or lines `subject: caption`; subjects not
    in it keep the default "a <class noun>"."""
    if file is None:
        return subjects
    file = Path(file)
    text = read_text(file, "--captions", MAX_TEXT_BYTES, ValueError)
    if file.suffix.lower() == ".json":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {file}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
            raise ValueError(f"--captions {file}: expected a JSON object {{subject: caption}}")
    else:
        d = {}
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                if ":" not in line:
                    raise ValueError(f"--captions {file}:{n}: expected 'subject: caption'")
                k, v = line.split(":", 1)
                d[k.strip()] = v.strip()
    names = {s.name for s in subjects}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"--captions {file}: unknown subject(s) {', '.join(unknown)}")
    return [replace(s, caption=d.get(s.name, s.caption)) for s in subjects]


def make_cases(subjects: list[Subject], templates: dict[str, list[str]], unique_token: str = "",
               limit: int | None = None) -> list[Case]:
    """Subject-major: every prompt of the first subject, then the next (the order sharding and --limit use)."""
    cases = []
    for s in subjects:
        for j, t in enumerate(templates["live" if s.live else "object"]):
            cases.append(Case(len(cases), s, j, render_prompt(t, s.class_noun, unique_token)))
    return cases[:limit] if limit is not None else cases
