"""Sharing a reference across its prompts (issue 27): per-image cost of a subject sweep against plain generation.

    python bench/share.py                      # CPU: full-width FLUX.1 blocks (hidden 3072), 1 double + 1 single
    python bench/share.py --prompts 25 --steps 4 --size 128 --record    # the recorded run (bench/RESULTS.md)
    python bench/share.py --device cuda --size 512 --double 19 --single 38    # a GPU: random FLUX.1-dev shapes

The transformer is random at FLUX.1's width (hidden 3072, 24 heads, MLP x4) with a few blocks; the text encoders
and autoencoder are the built-in model's (they cost the same in every column and little). Every method column
generates the same prompts with the same seed and steps; its time per image is the sweep's total over the number
of images, so the shared columns pay for their first image's reference:

  plain          pipe.generate
  PA, own        Personalize Anything (paper preset) with a fresh ReferenceCache(0) per image: the reference in a
                 pass of its own at every step, nothing kept (what every image paid before sharing)
  PA, shared     one ReferenceCache for the sweep: the first image computes the reference branch, the others read it
  FreeCus        the authors' reference prompt (the target's): nothing to share, one pass of its own per step
  FreeCus, ref-caption shared   the reference pass prompted with the caption alone: shared like PA

The issue's target: shared columns <= 1.15x plain per image. The images are timed prompt by prompt, every column
in turn (so a change in machine load hits all alike); the unshared columns on the first 3 prompts only.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402


def build(args):
    from minidit.pipeline import Pipeline
    from minidit.transformer import Flux, FluxConfig
    base = Pipeline.load(None, device=args.device)
    small = base.transformer.cfg
    cfg = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=small.vec_in_dim,
                     context_in_dim=small.context_in_dim, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
                     depth=args.double, depth_single_blocks=args.single, axes_dim=(16, 56, 56), qkv_bias=True,
                     guidance_embed=False)
    torch.manual_seed(0)
    model = Flux(cfg).to(args.device, base.dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    return Pipeline(model, base.ae, base.text, base.device, base.dtype, name="bench-full-width",
                    flow_schedule=base.flow_schedule)  # no minidit.json: no warning about the trained size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=25)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from minidit.masks import Reference
    from minidit.refcache import ReferenceCache
    from minidit.weights import world

    pipe = build(args)
    scene = world.Scene((world.place(world.Subject("circle", "red", "striped"), "in the centre", "large"),),
                        "flat", "blue")
    s = args.size
    ref = Reference(world.render(scene, s), (s // 4, s // 4, s // 2, s // 2))
    own_prompt = Reference(ref.image, ref.mask, "a red striped circle")
    rng = random.Random(0)
    prompts = [world.caption(world.sample_scene(rng), rng) for _ in range(args.prompts)]
    kw = dict(height=s, width=s, steps=args.steps, seed=0, return_latents=True)
    cuda = torch.device(args.device).type == "cuda"

    few = min(3, len(prompts))  # the unshared columns cost the same for every image: a few suffice
    caches = {"PA, shared": ReferenceCache(), "FreeCus ref-caption, shared": ReferenceCache()}
    columns = {  # name -> (one image of prompt p, how many prompts it is timed on)
        "plain": (lambda p: pipe.generate(p, true_cfg_scale=1.0, **kw), len(prompts)),
        "PA, own pass (unshared)": (lambda p: pipe.personalize(p, ref, cache=ReferenceCache(0), **kw), few),
        "PA, shared": (lambda p: pipe.personalize(p, ref, cache=caches["PA, shared"], **kw), len(prompts)),
        "FreeCus, authors' ref prompt (unshared)": (lambda p: pipe.freecus(p, ref, cache=ReferenceCache(0), **kw),
                                                    few),
        "FreeCus ref-caption, shared": (lambda p: pipe.freecus(p, own_prompt, cache=caches["FreeCus ref-caption, "
                                                                                          "shared"], **kw),
                                        len(prompts)),
    }
    pipe.generate("warm-up", true_cfg_scale=1.0, **kw)
    times = {k: [] for k in columns}
    for i, p in enumerate(prompts):  # prompt by prompt, every column in turn: a change of load hits all alike
        for name, (one, n) in columns.items():
            if i >= n:
                continue
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            one(p)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    per = {k: statistics.mean(v) for k, v in times.items()}  # the shared columns' mean includes their first image
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    cfg = pipe.transformer.cfg
    lines = [f"### {datetime.date.today()} {device}, {args.threads} thread(s), torch {torch.__version__}",
             "",
             f"Random FLUX.1-width transformer (hidden {cfg.hidden_size}, {cfg.num_heads} heads, {cfg.depth} double + "
             f"{cfg.depth_single_blocks} single blocks), {s}x{s} ({(s // 16) ** 2} image tokens), {args.steps} steps, "
             f"a {len(prompts)}-prompt sweep of one subject (mask: a box of 1/4 of the image), seed 0, "
             f"images timed one prompt at a time, the columns in turn (mean s/image; a shared column's mean includes "
             f"its first image, which computes the reference). Command: `python bench/share.py --prompts {args.prompts} --steps "
             f"{args.steps} --size {s} --double {args.double} --single {args.single} --threads {args.threads}`",
             "", "| column | images timed | s / image | x plain |", "|---|---:|---:|---:|"]
    for name, (_, n) in columns.items():
        lines.append(f"| {name} | {n} | {per[name]:.3f} | {per[name] / per['plain']:.2f} |")
    lines += ["", "Kept: " + "; ".join(f"{name}: {c.nbytes / 1e6:.1f} MB, {c.hits} steps read instead of run"
                                     for name, c in caches.items())]
    table = "\n".join(lines)
    print(table)
    if args.record:
        record("Sharing a reference across prompts", table,
               intro="`python bench/share.py` (issue 27, item 4): per-image cost of a subject's prompt sweep with "
                     "the reference branch computed once (minidit/refcache.py), against plain generation.")


if __name__ == "__main__":
    main()
