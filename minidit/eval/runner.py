"""Run an evaluation: every (subject, method row) unit's images, sharded over torchrun ranks, resumable.

    plan = Plan(out, subjects, cases, rows, seeds=[0], ...)
    check_out(plan)          # before any model loads: OUT is new, empty, or holds this very run (resume)
    run(plan)                # one process, or one rank of `torchrun --nproc_per_node N -m minidit.eval ...`

Work units are (subject, row) pairs in a fixed order (subjects as listed, rows as given), dealt round-robin to
the ranks: unit k goes to rank k mod WORLD_SIZE. A unit holds all of one subject's prompts and seeds for one
row, so what a method computes once per reference (the reference branch: Personalize Anything's trajectory and
the rows its targets read, FreeCus' keys/values with `+ref-caption`) stays in one rank's ReferenceCache for the
unit (`run_unit`, refcache.py): the first prompt of each seed computes it, the others read it, the same bits.
Each image is written atomically (minidit.image.save_png) as OUT/images/<row>/<subject>/<prompt>_s<seed>.png
with its record in a "minidit-eval" PNG chunk (`remake(png)` makes it again alone), then its scores are
appended as one JSON line to OUT/parts/<row>/<subject>.jsonl. A killed run resumes (a resumed unit's cache
starts empty, so its next image computes the reference again): an image
whose PNG exists is never generated again (scored again from the PNG if its line was lost), a torn last line is
dropped. Rank 0 then merges every unit's lines in the plan's order into OUT/cases.jsonl and writes the report
(report.py), so the result does not depend on how many ranks made it — provided the pixels do not either: the
intra-op thread count is pinned (`--threads`, default 4, recorded) instead of torchrun's OMP_NUM_THREADS=1 or a
plain process's all-cores, every image is sampled alone with its own seed, and scored alone.

OUT/run.json records what decides the results (cases, rows, seeds, size, steps, guidance, weights, dtype,
device type, threads, metric checkpoints); an OUT holding another run is refused, never overwritten.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..files import sha256
from ..image import save_png
from ..masks import Reference
from ..pipeline import Pipeline
from ..refcache import ReferenceCache
from . import methods, report
from .cases import Case, Subject, image_size
from .metrics import ClipMetric, DinoMetric, cosine
from .world import world_metrics, write_references

RUN_FILE = "run.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
JSON_KEY = "minidit-eval"


@dataclass
class Plan:
    out: Path
    subjects: list[Subject]
    cases: list[Case]
    rows: list[methods.Row]
    seeds: list[int]
    source: dict                       # where the cases come from, all subjects before --limit (run.json)
    height: int | None = None          # None: the reference's own size
    width: int | None = None
    steps: int | None = None           # None: the pipeline's default, the same for every row
    guidance: float = 3.5
    weights: str | None = None         # None: the built-in model
    device: str | None = None
    dtype: str | None = None
    threads: int = 4
    metric_clip: str | None = None
    metric_dino: str | None = None
    quiet: bool = False
    cache_gb: float = 8.0              # the rows one (subject, row) keeps for its other prompts (refcache.py)
    share: bool = True                 # False: nothing kept (every image computes its reference; same bits)

    def size(self, s: Subject) -> tuple[int, int]:
        if self.height and self.width:
            return self.height, self.width
        w, h = s.world["image"].size if s.world else image_size(s.reference, "--dreambench")
        return self.height or h, self.width or w

    def shown(self, path: str) -> str:
        """A path as recorded: relative to OUT when inside it (--world's references), so results do not depend
        on where OUT is; otherwise as given."""
        try:
            return str(Path(path).resolve().relative_to(self.out.resolve()))
        except ValueError:
            return str(path)

    def units(self) -> list[tuple[Subject, methods.Row]]:
        return [(s, r) for s in self.subjects for r in self.rows if any(c.subject.name == s.name for c in self.cases)]

    def jobs(self, subject: Subject, row: methods.Row) -> list[tuple[Case, int, str]]:
        """(case, seed, file relative to OUT) of one unit, in order."""
        return [(c, seed, f"images/{row.tag}/{subject.name}/{c.prompt_index:02d}_s{seed}.png")
                for c in self.cases if c.subject.name == subject.name for seed in self.seeds]

    def identity(self) -> dict:
        """What decides the pixels and scores; equal identities may share an OUT (resume, --limit)."""
        return {"minidit": __version__, "source": self.source, "reference_pass": "own",  # not batched: refcache.py
                "rows": [r.label for r in self.rows], "seeds": self.seeds, "height": self.height,
                "width": self.width, "steps": self.steps, "guidance": self.guidance, "weights": self.weights,
                "device_type": _device_type(self.device), "dtype": self.dtype, "threads": self.threads,
                "metric_clip": self.metric_clip and str(Path(self.metric_clip).resolve()),
                "metric_dino": self.metric_dino and str(Path(self.metric_dino).resolve())}


def _device_type(device: str | None) -> str:
    return torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ OUT folder

def check_out(plan: Plan) -> bool:
    """True when OUT holds this run already (resume). A new OUT is fine; anything else is a one-line error."""
    out = plan.out
    if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
        raise ValueError(f"--out {out}: exists and is not a folder")
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ValueError(f"--out {out}: {RUN_FILE} is unreadable; not overwriting it (give another --out)") from None
        new = plan.identity()
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ValueError(f"--out {out} holds another run's results (it differs in: {', '.join(diff)}); "
                             "give another --out (nothing is overwritten)")
        return True
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty and not an evaluation folder (no {RUN_FILE}); give a new or "
                         "empty folder")
    return False


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_out(plan: Plan) -> None:
    """Rank 0, after check_out: the folder, run.json and the --world references."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if not (plan.out / RUN_FILE).exists():
        _write_json(plan.out / RUN_FILE, {"identity": plan.identity()})
    world = [s for s in plan.subjects if s.world]
    if world:
        write_references(world, lambda img, path: path.exists() or save_png(img, path))


# ---------------------------------------------------------------------------------------------- distributed

def rank_and_size() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: torch.device) -> bool:
    """torchrun: a process group (NCCL on GPUs, gloo on CPU) for the two barriers; a long timeout, since rank
    0 waits at the second one for the slowest rank's whole share."""
    if rank_and_size()[1] == 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(days=7))
    return True


def barrier(active: bool, device: torch.device) -> None:
    if active:
        dist.barrier(device_ids=[device.index or 0]) if device.type == "cuda" else dist.barrier()


# --------------------------------------------------------------------------------------------------- scoring

class Scorer:
    """The run's metric models; reference and text features are computed once per subject / prompt."""

    def __init__(self, plan: Plan, device: torch.device):
        self.clip = ClipMetric.load(plan.metric_clip, device) if plan.metric_clip else None
        self.dino = DinoMetric.load(plan.metric_dino, device) if plan.metric_dino else None
        self.refs: dict[str, tuple] = {}
        self.texts: dict[str, torch.Tensor] = {}

    def describe(self) -> dict:
        out = {}
        for key, m in (("clip", self.clip), ("dino", self.dino)):
            if m is not None:
                out[key] = {"checkpoint": m.name, "folder": m.folder, "transform": m.transform}
        return out

    def _reference(self, s: Subject):
        if s.name not in self.refs:
            with Image.open(s.reference) as im:
                ref = im.convert("RGB")
            self.refs[s.name] = (self.clip.image_features([ref]) if self.clip else None,
                                 self.dino.features([ref]) if self.dino else None)
        return self.refs[s.name]

    def score(self, image: Image.Image, case: Case) -> dict:
        out = {}
        clip_ref, dino_ref = self._reference(case.subject)
        if self.clip is not None:
            if case.prompt not in self.texts:
                self.texts[case.prompt] = self.clip.text_features([case.prompt])
            f = self.clip.image_features([image])
            out["clip_t"] = float(cosine(f, self.texts[case.prompt])[0])
            out["clip_i"] = float(cosine(f, clip_ref)[0])
        if self.dino is not None:
            out["dino"] = float(cosine(self.dino.features([image]), dino_ref)[0])
        if case.truth is not None:
            out.update(world_metrics(image, case))
        return out


# ------------------------------------------------------------------------------------------------- one unit

def read_lines(path: Path) -> dict[str, dict]:
    """{file: line} of a unit's scores; a torn or broken line (a killed write) is dropped."""
    out = {}
    if path.is_file():
        for text in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(text)
                out[d["file"]] = d
            except (ValueError, KeyError, TypeError):
                continue
    return out


@functools.lru_cache(maxsize=256)
def file_sha256(path: str) -> str:
    return sha256(path, "reference", error=ValueError)[:16]  # files.py: the guarded reader


def png_info(plan: Plan, row: methods.Row, case: Case, seed: int, size: tuple[int, int], steps: int,
             pipe) -> PngInfo:
    """The image's record: an A1111-style "parameters" text and a JSON chunk with the row, settings and case
    (the reference and mask files with their hashes), enough to make the image again alone."""
    s = case.subject
    pipe_name = pipe.name
    rec = {"minidit_version": __version__, "method": row.method, "row": row.label, "settings": row.record(),
           "prompt": case.prompt, "caption": s.subject_caption if row.uses_caption else None,
           "seed": seed, "steps": steps, "guidance": plan.guidance, "height": size[0], "width": size[1],
           "weights": plan.weights or "built-in", "model": pipe_name, "dtype": str(pipe.dtype).removeprefix("torch."),
           "device": pipe.device.type, "threads": plan.threads, "subject": s.name,
           "reference": plan.shown(s.reference), "reference_sha256": file_sha256(s.reference),
           "mask": s.mask_record if not isinstance(s.mask, str) else plan.shown(s.mask),
           "mask_sha256": file_sha256(s.mask) if isinstance(s.mask, str) else None}
    info = PngInfo()
    info.add_text("parameters", f"{case.prompt}\nSteps: {steps}, Seed: {seed}, Size: {size[1]}x{size[0]}, "
                                f"Method: {row.label}, Model: {pipe_name}, Version: minidit {__version__}")
    info.add_text(JSON_KEY, json.dumps(rec))
    return info


def remake(png: str | Path, out: str | Path | None = None, device: str | None = None) -> Image.Image:
    """The image a PNG of an evaluation records, made again alone from its JSON chunk (row, settings, prompt,
    caption, seed, size, steps, guidance, weights, reference and mask; paths relative to `out`, default the
    folder above images/). Pins the recorded thread count, as the run did; refuses a changed reference or mask."""
    with Image.open(png) as im:
        rec = json.loads(im.text[JSON_KEY])
    root = Path(out) if out is not None else Path(png).resolve().parents[3]
    files = {k: (root / rec[k] if not Path(rec[k]).is_absolute() else Path(rec[k])) for k in ("reference", "mask")}
    for k in ("reference", "mask"):
        if rec.get(f"{k}_sha256") and file_sha256(str(files[k])) != rec[f"{k}_sha256"]:
            raise ValueError(f"{png}: the {k} {files[k]} has changed since the image was made")
    if rec.get("mask_sha256"):
        mask = str(files["mask"])                                  # a mask file
    elif rec["mask"] == "whole image":
        mask = None
    else:
        mask = tuple(int(v) for v in rec["mask"].split(","))       # a box x,y,w,h
    (row,) = methods.parse_methods(rec["row"])
    torch.set_num_threads(rec["threads"])
    pipe = Pipeline.load(None if rec["weights"] == "built-in" else rec["weights"], device=device,
                         dtype=getattr(torch, rec["dtype"]))
    return methods.generate(pipe, row, Reference(str(files["reference"]), mask), rec["prompt"],
                            rec["caption"] or "", rec["seed"], rec["height"],
                            rec["width"], rec["steps"], rec["guidance"])


def run_unit(plan: Plan, pipe, scorer: Scorer, subject: Subject, row: methods.Row, steps: int, progress) -> None:
    """Every image of one (subject, row): generated unless its PNG exists, scored unless its line exists. A row
    whose reference branch does not depend on the prompt (`Row.shares`) keeps it in one ReferenceCache for all
    its prompts (computed by the first image of each seed, read by the others: the same bits, refcache.py)."""
    part = plan.out / "parts" / row.tag / f"{subject.name}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    done = read_lines(part)
    if part.is_file():  # drop a torn tail before appending again
        _write_lines(part, done.values())
    height, width = plan.size(subject)
    reference = Reference(subject.reference, subject.mask)  # mask: a file, a pixel box, or None (all)
    cache = ReferenceCache(plan.cache_gb) if plan.share and row.shares else None  # None: keep nothing
    for case, seed, file in plan.jobs(subject, row):
        path = plan.out / file
        made = False
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            image = methods.generate(pipe, row, reference, case.prompt, subject.subject_caption, seed, height,
                                     width, steps, plan.guidance, cache)
            save_png(image, path, png_info(plan, row, case, seed, (height, width), steps, pipe))
            made = True
        if file not in done:
            with Image.open(path) as im:
                image = im.convert("RGB")  # scored from the PNG's pixels, as a resumed run would
            line = {"subject": subject.name, "class": subject.class_noun, "reference": plan.shown(subject.reference),
                    "mask": plan.shown(subject.mask) if isinstance(subject.mask, str) else subject.mask_record,
                    "prompt": case.prompt, "prompt_index": case.prompt_index,
                    "caption": subject.subject_caption if row.uses_caption else None,
                    "method": row.method, "row": row.label, "settings": row.record(), "seed": seed, "file": file,
                    **scorer.score(image, case)}
            with open(part, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
                f.flush()
                os.fsync(f.fileno())
            done[file] = line
        progress(made)


def _write_lines(path: Path, lines) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(d) + "\n" for d in lines), encoding="utf-8")
    os.replace(tmp, path)


class Progress:
    """'[rank 0/2] 12/40 images (4 from before), 1.3 s/image, ETA 36 s' on stderr, per image."""

    def __init__(self, rank: int, size: int, total: int, quiet: bool):
        self.rank, self.size, self.total, self.quiet = rank, size, total, quiet
        self.done = self.before = self.made = 0
        self.t0 = time.perf_counter()

    def __call__(self, made: bool) -> None:
        self.done += 1
        self.made += made
        self.before += not made
        if self.quiet:
            return
        rate = (time.perf_counter() - self.t0) / self.made if self.made else 0.0
        eta = rate * (self.total - self.done)
        print(f"[rank {self.rank}/{self.size}] {self.done}/{self.total} images ({self.before} from before), "
              f"{rate:.2f} s/image, ETA {eta:.0f} s", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- the run

def run(plan: Plan) -> dict | None:
    """This process's share of the plan; on rank 0 the merged results and report (returned)."""
    torch.set_num_threads(plan.threads)
    rank, size = rank_and_size()
    device = torch.device(plan.device) if plan.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    active = init_distributed(device)
    try:
        if rank == 0:
            check_out(plan)  # again, now that every rank has checked: still this run or new
            prepare_out(plan)
        barrier(active, device)
        pipe = Pipeline.load(plan.weights, device=device, dtype=DTYPES[plan.dtype] if plan.dtype else None)
        steps = plan.steps or pipe.default_steps
        scorer = Scorer(plan, device)
        mine = [u for k, u in enumerate(plan.units()) if k % size == rank]
        progress = Progress(rank, size, sum(len(plan.jobs(s, r)) for s, r in mine), plan.quiet)
        for subject, row in mine:
            run_unit(plan, pipe, scorer, subject, row, steps, progress)
        barrier(active, device)
        if rank == 0:
            return merge(plan, scorer, steps)
        return None
    finally:
        if active:
            dist.destroy_process_group()


def merge(plan: Plan, scorer: Scorer, steps: int) -> dict:
    """Rank 0: every unit's lines in the plan's order -> cases.jsonl, metrics.json, metrics.md, tradeoff.png."""
    lines = []
    for subject, row in plan.units():
        got = read_lines(plan.out / "parts" / row.tag / f"{subject.name}.jsonl")
        for _, _, file in plan.jobs(subject, row):
            if file not in got:
                raise RuntimeError(f"{file}: no scores after every rank finished (a rank failed?); run again to resume")
            lines.append(got[file])
    _write_lines(plan.out / "cases.jsonl", lines)
    return report.write(plan.out, lines, plan.rows, {"metrics": scorer.describe(), "threads": plan.threads,
                                                     "steps": steps, "identity": plan.identity()})
