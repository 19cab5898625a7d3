"""Cost of Personalize Anything against plain generation with the same number of steps.

    python bench/personalize.py                  # CPU, the built-in tiny checkpoint: end to end and the loop
    python bench/personalize.py --full           # GPU: random full-size FLUX.1-dev weights (bf16), the loop only
    python bench/personalize.py --weights PATH   # any FLUX.1 folder, end to end and the loop
    ... --record                                 # add the table to the "Personalize Anything" section of RESULTS.md

Each reference is one extra batch item: while tokens are replaced (the first (1 - τ) of the steps) and, with
later-stage tokens (`concat`, the default), for the rest of the steps too, where the targets' attention also
gets the subject's keys/values. Without concat the references leave the batch after τ. So per step the model
predicts  (1 + n_ref)  (concat)  or  1 + n_ref·(1 - τ)  (no concat)  forwards' worth of work (printed as
"model"); γ = 1 inversion costs no model call. The end-to-end row also includes VAE-encoding the reference and
its prompt.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, record



def compare(baseline, ours, repeats: int, cuda: bool) -> tuple[float, float]:
    """Best wall time of `repeats` alternated calls each (one warm-up call each first)."""
    a, b = alternate(baseline, ours, repeats, cuda)
    return min(a), min(b)


def subject_mask(size: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[size // 4: 3 * size // 4, size // 5: 4 * size // 5] = 1  # a box covering 30 % of the image
    return m


def corner_mask(size: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[: size // 4, : size // 4] = 1                             # the second subject, disjoint from the first
    return m


CASES = [  # (label, n_ref, concat)
    ("1 ref, τ=0.8, concat", 1, True),
    ("1 ref, τ=0.8, no concat", 1, False),
    ("2 refs, τ=0.8, concat", 2, True),
]


def model_ratio(n_ref: int, concat: bool, tau: float, steps: int) -> float:
    from minidit.personalize import replace_steps
    k = replace_steps(tau, steps)
    return 1 + n_ref if concat else 1 + n_ref * k / steps


def bench_pipeline(args, device) -> list[tuple[str, float, float, float]]:
    from minidit.masks import Reference
    from minidit.pipeline import Pipeline
    pipe = Pipeline.load(args.weights, device=device)
    g = torch.Generator().manual_seed(0)
    refs = [Reference(torch.rand(3, args.size, args.size, generator=g) * 2 - 1, m)
            for m in (subject_mask(args.size), corner_mask(args.size))]
    cuda = device.type == "cuda"
    prompt = "a photo of a dog"
    plain = partial(pipe.generate, prompt, height=args.size, width=args.size, steps=args.steps, seed=0,
                    return_latents=True)
    rows = []
    for label, n, concat in CASES:
        ours = partial(pipe.personalize, prompt, refs[:n], placement=[None] * n, concat=concat, steps=args.steps,
                       seed=0, return_latents=True)
        base, t = compare(plain, ours, args.repeats, cuda)
        rows.append((f"end to end, {label}", base, t, model_ratio(n, concat, 0.8, args.steps)))
    return rows + bench_loop(pipe.transformer, args, device, pipe.dtype)


def bench_loop(model, args, device, dtype) -> list[tuple[str, float, float, float]]:
    from minidit import sampling
    from minidit.masks import token_indices, token_mask
    from minidit.personalize import PersonalizeSettings, replace_steps
    from minidit.trajectory import ReferenceTrajectory
    from minidit.regions import Region
    H = W = args.size
    N, L, cfg = (H // 16) * (W // 16), args.txt_len, model.cfg
    g = torch.Generator().manual_seed(0)
    ts = sampling.get_schedule(args.steps, N, shift=cfg.guidance_embed)
    ids = sampling.image_ids(1, H, W, device)
    idx = [token_indices(token_mask(m(H))).to(device) for m in (subject_mask, corner_mask)]
    regions = [Region(i, i) for i in idx]
    cuda = device.type == "cuda"

    def tensors(B):
        return (torch.randn(B, L, cfg.context_in_dim, generator=g).to(device, dtype),
                torch.zeros(B, L, 3, device=device), torch.randn(B, cfg.vec_in_dim, generator=g).to(device, dtype))

    img = sampling.noise(1, H, W, 0, device, dtype)
    plain = partial(sampling.denoise, model, img, ids.expand(1, -1, -1), *tensors(1), ts, 3.5)
    rows = []
    for label, n, concat in CASES:
        txt, tid, vec = tensors(n + 1)
        x_ref = torch.randn(n, N, 64, generator=g).to(device, dtype)
        s = PersonalizeSettings(concat=concat)

        def ours(x_ref=x_ref, txt=txt, tid=tid, vec=vec, n=n, s=s):  # a branch carries its state: a new one per run
            branch = ReferenceTrajectory(x_ref, x_ref, ids.expand(n, -1, -1), txt[:n], tid[:n], vec[:n], regions[:n],
                                         args.steps, s, n_replace=replace_steps(0.8, args.steps))
            return sampling.denoise(model, img, ids, txt[n:], tid[n:], vec[n:], ts, 3.5, branch=branch)
        base, t = compare(plain, ours, args.repeats, cuda)
        rows.append((f"loop, {label}", base, t, model_ratio(n, concat, 0.8, args.steps)))
    return rows


def random_model(cfg, device, dtype=torch.bfloat16):
    """A FLUX transformer with random weights, allocated directly in `dtype` on `device` (timing only)."""
    from minidit.transformer import Flux
    with torch.device("meta"):
        model = Flux(cfg).to(dtype)
    model = model.to_empty(device=device).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def table(rows, device_name: str, args) -> str:
    lines = ["| case | device | size | steps | generate s | personalize s | ratio | model |",
             "|---|---|---|---|---|---|---|---|"]
    for label, base, ours, model in rows:
        lines.append(f"| {label} | {device_name} | {args.size}² | {args.steps} | {base:.3f} | {ours:.3f} | "
                     f"{ours / base:.2f}× | {model:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="FLUX.1 folder (default: the built-in tiny checkpoint)")
    ap.add_argument("--full", action="store_true", help="random full-size FLUX.1-dev on the GPU, loop only")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 256 tiny, 1024 full)")
    ap.add_argument("--steps", type=int, default=None, help="default 10 tiny, 28 full")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant (the best counts)")
    ap.add_argument("--txt-len", type=int, default=512, help="text tokens in the loop-only rows")
    ap.add_argument("--device", default=None)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.size = args.size or (1024 if args.full or args.weights else 256)
    args.steps = args.steps or (28 if args.full or args.weights else 10)
    with torch.no_grad():
        if args.full:
            if device.type != "cuda":
                sys.exit("--full needs a GPU")
            from minidit.transformer import FluxConfig
            rows = bench_loop(random_model(FluxConfig.preset("flux-dev"), device), args, device, torch.bfloat16)
            what = "random full-size FLUX.1-dev, bf16"
        else:
            rows = bench_pipeline(args, device)
            what = args.weights or "built-in tiny checkpoint"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    text = table(rows, name, args)
    print(text)
    print("\nratio = personalize time / generate time (best of --repeats, alternated; same steps, same seed); "
          "model = the batch-size model above")
    if args.record:
        record("Personalize Anything", f"### {what}, {name}, torch {torch.__version__}, {datetime.date.today()}\n\n{text}")


if __name__ == "__main__":
    main()
