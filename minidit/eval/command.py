"""`minidit eval` / `python -m minidit.eval`: options, their checks, the run.

    python -m minidit.eval --world --out runs/world --steps 16 \\
        --methods "plain,personalize:official,personalize:paper+tau=0.6|0.7|0.8|0.9,freecus:paper,freecus:paper+no-ans,freecus:paper+lambda=1,freecus:paper+no-caption"
    python -m minidit.eval --dreambench ../shared/dreambench --masks masks/ --weights /models/FLUX.1-dev \\
        --metric-clip /models/clip-vit-base-patch32 --metric-dino /models/dino-vits16 --out runs/db \\
        --methods plain,personalize:official,freecus:paper --height 1024 --width 1024
    torchrun --nproc_per_node 8 -m minidit.eval ...                      # one node, 8 GPUs (NCCL)
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 -m minidit.eval ...                   # two nodes; OUT on a shared filesystem

Every option, input file, metric folder and OUT is checked before any model loads; a problem is one line on
stderr and exit code 1, with nothing written.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .. import validate
from ..loading import CheckpointError
from ..masks import Reference, load_reference, require_nonempty, token_mask_rule
from . import cases as cases_mod
from .methods import parse_methods
from .metrics import check_folder
from .runner import DTYPES, Plan, check_out, run
from .world import world_cases

DEFAULT_METHODS = "plain,personalize:official,freecus:paper"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dreambench", metavar="DIR", help="a DreamBench folder: one folder of photos per subject "
                     "and prompts_and_classes.txt (e.g. ../shared/dreambench)")
    src.add_argument("--world", action="store_true", help="a small DreamBench drawn from the built-in model's "
                     "procedural world, with its ground-truth detectors as extra metrics")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder: new, empty, or this run's (resume)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="method rows: METHOD[:PRESET][+FIELD=VALUE|VALUE...]"
                   "[+no-ans|+lambda=1|+no-caption], comma-separated (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every case (default: 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N cases (subject x prompt, each with "
                   "its seeds; default: all)")
    p.add_argument("--subjects", default=None, help="--dreambench: comma-separated subjects (default: all)")
    p.add_argument("--unique-token", default="", help="--dreambench: the prompts' {0} (default: none, as the "
                   "training-free papers)")
    p.add_argument("--masks", default=None, metavar="DIR", help="subject masks: DIR/<subject>.png or "
                   "DIR/<subject>/<photo stem>.png, the reference's size (default: the whole image)")
    p.add_argument("--box", default=None, metavar="X,Y,W,H", help="one subject box for every reference, in pixels")
    p.add_argument("--captions", default=None, metavar="FILE", help="FreeCus captions: JSON {subject: caption} "
                   "or lines 'subject: caption' (default: 'a <class noun>')")
    p.add_argument("--world-subjects", type=int, default=6, help="--world: subjects (default: 6)")
    p.add_argument("--world-prompts", type=int, default=4, help="--world: prompts per subject (default: 4)")
    p.add_argument("--weights", default=None, help="FLUX.1 folder or HF cache repo name (default: the built-in "
                   "tiny model)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default: the reference's)")
    p.add_argument("--steps", type=int, default=None, help="steps of every row (default: the pipeline's, 28 dev)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev guidance (default: 3.5)")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK under torchrun) if available")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=4, help="intra-op CPU threads of every process, pinned so "
                   "the images do not depend on the launch (default: 4)")
    p.add_argument("--metric-clip", default=None, metavar="DIR", help="CLIP folder (CLIPModel layout, e.g. "
                   "openai/clip-vit-base-patch32, the common DreamBench choice; ViT-L/14 works too) for CLIP-T "
                   "and CLIP-I (default: none)")
    p.add_argument("--metric-dino", default=None, metavar="DIR", help="DINO ViT folder (ViTModel layout, e.g. "
                   "facebook/dino-vits16, the common DreamBench choice) for DINO (default: none)")
    p.add_argument("--cache-gb", type=float, default=8.0, help="memory (on the generating device) for the "
                   "reference rows one subject shares with its other prompts; steps past it are recomputed "
                   "(default: 8; bytes per subject: minidit/refcache.py)")
    p.add_argument("--no-share", action="store_true", help="compute every image's reference branch itself "
                   "(the same images, slower: the check of the sharing)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _positive(name: str, v: int | None, lo: int = 1) -> None:
    if v is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")


def make_plan(args: argparse.Namespace) -> Plan:
    """Every check that needs no model; raises ValueError (one line) on the first problem."""
    for name in ("limit", "threads", "world_subjects", "world_prompts", "steps"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 16 or v % 16):
            raise ValueError(f"--{name} must be a positive multiple of 16, got {v}")
    if args.device is not None:
        try:
            validate.device(args.device)
        except ValueError as e:
            raise ValueError(f"--device: {e}") from None
    if any(not 0 <= s < 2 ** 63 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct integers in [0, 2^63), got {args.seeds}")
    if not (math.isfinite(args.cache_gb) and args.cache_gb >= 0):
        raise ValueError(f"--cache-gb must be a finite number >= 0, got {args.cache_gb}")
    rows = parse_methods(args.methods)
    out = Path(args.out)
    if args.world:
        if args.masks or args.box or args.captions or args.subjects:
            raise ValueError("--masks, --box, --captions and --subjects are for --dreambench (--world has its own)")
        subjects, cases = world_cases(out, args.world_subjects, args.world_prompts, limit=args.limit)
        source = {"world": {"subjects": args.world_subjects, "prompts": args.world_prompts}}
    else:
        names = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        subjects, templates = cases_mod.read_dreambench(args.dreambench, names)
        box = cases_mod.parse_box(args.box) if args.box else None
        subjects = cases_mod.with_captions(cases_mod.with_masks(subjects, args.masks, box), args.captions)
        cases = cases_mod.make_cases(subjects, templates, args.unique_token, args.limit)
        source = {"dreambench": str(Path(args.dreambench).resolve()), "unique_token": args.unique_token,
                  "masks": args.masks and str(Path(args.masks).resolve()), "box": args.box,
                  "captions": {s.name: s.subject_caption for s in subjects}}
    source["subjects"] = [s.name for s in subjects]  # before --limit: a longer --limit may resume this OUT
    used = {c.subject.name for c in cases}
    subjects = [s for s in subjects if s.name in used]
    if args.height is None or args.width is None:
        for s in subjects:
            w, h = s.world["image"].size if s.world else cases_mod.image_size(s.reference, "--dreambench")
            if (args.height or h) % 16 or (args.width or w) % 16:
                raise ValueError(f"the reference {s.reference} is {w}x{h}, not a multiple of 16: pass --height "
                                 "and --width (the reference is resized to them)")
    check_masks(subjects, rows, args.height, args.width)
    if args.metric_clip:
        check_folder(Path(args.metric_clip), "--metric-clip", "clip")
    if args.metric_dino:
        check_folder(Path(args.metric_dino), "--metric-dino", "vit")
    plan = Plan(out, subjects, cases, rows, list(args.seeds), source, args.height, args.width, args.steps,
                args.guidance, args.weights, args.device, args.dtype, args.threads, args.metric_clip,
                args.metric_dino, args.quiet, args.cache_gb, not args.no_share)
    check_out(plan)
    return plan


def check_masks(subjects, rows, height: int | None, width: int | None) -> None:
    """Every subject mask has a token at the generated size under each row's mask rule (else the method would
    fail midway, after the models loaded)."""
    rules = sorted({r.settings().mask_rule for r in rows if r.method != "plain"})
    for s in subjects:
        if s.mask is None or not rules:
            continue
        image = s.world["image"] if s.world else s.reference
        mask = torch.from_numpy(s.world["mask"].astype("float32")) if s.world else s.mask
        _, m = load_reference(Reference(image, mask), height, width, f"{s.name}'s reference")
        for rule in rules:
            require_nonempty(token_mask_rule(m, rule), f"{s.name}'s subject mask at {m.shape[1]}x{m.shape[0]} "
                                                        f"({rule!r} rule)")


def build_parser(prog: str = "python -m minidit.eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m minidit.eval") -> None:
    args = build_parser(prog).parse_args(argv)
    try:
        plan = make_plan(args)
    except (ValueError, CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    result = run(plan)
    if result is not None and not plan.quiet:
        print(f"wrote {plan.out}/cases.jsonl, metrics.json, metrics.md, tradeoff.png "
              f"({sum(r['count'] for r in result['rows'])} images)", file=sys.stderr)
