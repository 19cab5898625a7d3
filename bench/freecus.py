"""Cost of FreeCus against plain generation with the same number of steps.

    python bench/freecus.py                    # CPU, the built-in tiny checkpoint: end to end and the denoising loop
    python bench/freecus.py --full             # GPU: random full-size FLUX.1-dev weights (bf16), denoising loop
    python bench/freecus.py --weights PATH     # any FLUX.1 folder, end to end and the loop
    ... --record                               # add the table to the "FreeCus" section of bench/RESULTS.md

FreeCus runs one extra batch item (the noised reference) through the transformer up to the last vital layer
(56 of 57 with FLUX.1's defaults) and adds the subject's reference keys to the targets' attention on the 10 vital
layers; nothing else changes. So where the GPU is compute-bound the ratio tends to 1 + (last vital layer + 1)/57
≈ 2, and the script also prints that FLOP count ("model") next to the measurement.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, alternate, record



def timeit_pair(plain, ours, repeats: int, cuda: bool) -> tuple[float, float]:
    """Median wall times of `repeats` alternated calls each (one warm-up call each first)."""
    a, b = alternate(plain, ours, repeats, cuda)
    return sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]


def flops_ratio(cfg, n_img: int, n_txt: int, vital: list[int], subject_fraction: float, batch: int = 1) -> float:
    """Matmul FLOPs of a FreeCus forward over those of a plain one (per step; the loops differ in nothing else)."""
    h, L = cfg.hidden_size, n_img + n_txt
    mlp = int(h * cfg.mlp_ratio)
    per_layer = 2 * L * (4 * h * h + 2 * h * mlp) + 4 * L * L * h  # projections + MLP, then QK^T and AV
    plain = batch * cfg.n_layers * per_layer
    ref = (max(vital) + 1) * per_layer if vital else 0
    extra = batch * len(vital) * 4 * L * int(subject_fraction * n_img) * h
    return (plain + ref + extra) / plain


def reference_and_mask(size: int):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())
    m = torch.zeros(size, size)
    m[size // 4: 3 * size // 4, size // 5: 4 * size // 5] = 1  # a box covering 30 % of the image
    mask = Image.fromarray((m * 255).to(torch.uint8).numpy())
    return img, mask


def bench_pipeline(args, device) -> list[tuple[str, float, float]]:
    from minidit.freecus import freecus
    from minidit.masks import Reference
    from minidit.pipeline import T5_MAX_LENGTH, Pipeline
    pipe = Pipeline.load(args.weights, device=device)
    img, mask = reference_and_mask(args.size)
    ref = Reference(img, mask)
    cuda = device.type == "cuda"
    kw = dict(height=args.size, width=args.size, steps=args.steps, seed=0)
    plain, ours = timeit_pair(lambda: pipe.generate("a photo of a dog", return_latents=True, **kw),
                              lambda: freecus(pipe, "a photo of a dog", ref, caption="brown fur", return_latents=True,
                                              **kw), args.repeats, cuda)
    x = torch.rand(1, 3, args.size, args.size) * 2 - 1
    enc, _ = timeit_pair(lambda: pipe.encode_image(x), lambda: None, args.repeats, cuda)
    rows = [(f"end to end (text, VAE, loop; VAE-encoding the reference alone: {enc:.3f} s)", plain, ours)]
    return rows + bench_loop(pipe.transformer, args, device, pipe.dtype, txt_len=T5_MAX_LENGTH[pipe.variant])


def bench_loop(model, args, device, dtype, txt_len: int) -> list[tuple[str, float, float]]:
    from minidit import sampling
    from minidit.freecus import NoisedReference, default_vital_layers, reference_sigmas
    cfg, cuda = model.cfg, device.type == "cuda"
    h, w = sampling.latent_size(args.size, args.size)
    n = (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(0)
    def mk(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    img, txt, vec = mk(1, n, cfg.in_channels), mk(1, txt_len, cfg.context_in_dim), mk(1, cfg.vec_in_dim)
    ids, txt_ids = sampling.image_ids(1, args.size, args.size, device), sampling.text_ids(1, txt_len, device)
    x_ref, eps = mk(1, n, cfg.in_channels), mk(1, n, cfg.in_channels)
    subject = torch.arange(n, device=device)[torch.rand(n, generator=g).to(device) < 0.3]
    ts = sampling.get_schedule(args.steps, n)
    sig = reference_sigmas(args.steps, n)
    vital = default_vital_layers(cfg.depth, cfg.depth_single_blocks)
    plain, ours = timeit_pair(lambda: sampling.denoise(model, img, ids, txt, txt_ids, vec, ts, 3.5),
                              lambda: sampling.denoise(model, img, ids, txt, txt_ids, vec, ts, 3.5, branch=NoisedReference(
                                  model, x_ref, eps, sig, subject, ids, txt, txt_ids, vec, vital)), args.repeats, cuda)
    skip = flops_ratio(cfg, n, txt_len, vital, len(subject) / n)  # masked-out reference keys skipped (Triton)
    full = flops_ratio(cfg, n, txt_len, vital, 1.0)                  # ... or computed and masked (SDPA)
    print(f"FLOP model of the loop: {skip:.2f}x with only the subject's reference keys computed, {full:.2f}x with "
          f"all of them (reference up to layer {max(vital)} of {cfg.n_layers}, {len(subject)}/{n} subject tokens, "
          f"{txt_len} text tokens)")
    return [(f"denoising loop only (FLOP model {skip:.2f}x / {full:.2f}x)", plain, ours)]


def full_model(device):
    from minidit.transformer import Flux, FluxConfig
    cfg = FluxConfig.preset("flux-dev")
    with torch.device("meta"):
        model = Flux(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)  # bf16 straight away: 24 GB, never 48
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


INTRO = """`bench/freecus.py`: `pipe.freecus` against `pipe.generate` with the same steps (30, the authors'), size
and seed; `--record` appends a table here. FreeCus adds one batch item, the reference noised to σ'_t, which runs
up to the last vital layer (layer 56 of 57 with FLUX.1's defaults, i.e. nearly the whole network) and whose
subject keys/values join the targets' attention on the 10 vital layers; nothing is stored across layers or steps.
Expected per-step work ("FLOP model", matmul FLOPs of the loop): ≈ 2.0x for FLUX.1-dev at 512² and 1024² (2.003x
at 512², 30 % subject, masked-out keys skipped; 2.009x with all reference keys computed). The issue's target of
≤ 1.8x on GPU is therefore not reachable with the default vital layers when the GPU is compute-bound: it needs the
reference to stop earlier (vital layers up to 28 only: 1.51x by the same model). The authors' own code runs two full
pipeline passes (2x) and keeps every layer's K/V of every step in memory. The "loop" rows time only the denoising
loop (random text states of 512 tokens); "end to end" adds the text encoders and VAE-encoding the reference. On
CPU, SDPA computes the masked reference keys too and masked SDPA cannot use the fused CPU kernel, so the CPU loop
ratio follows the second FLOP figure; the tiny checkpoint's absolute times mean little. No GPU was lent to the
session that wrote this: for full size run `python bench/freecus.py --full --record` (random FLUX.1-dev weights,
bf16, loop only, needs ~24 GB) or `--weights PATH --record`."""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=None, help="FLUX.1 folder (default: the built-in tiny checkpoint)")
    ap.add_argument("--full", action="store_true", help="random full-size FLUX.1-dev on the GPU, loop only")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="pixels (default 256 tiny, 512 otherwise: the authors')")
    ap.add_argument("--steps", type=int, default=30, help="the authors' 30 by default")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    tiny = args.weights is None and not args.full
    args.size = args.size or (256 if tiny else 512)
    args.repeats = args.repeats or (5 if tiny else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.full and device.type != "cuda":
        raise SystemExit("--full needs a CUDA GPU (about 24 GB for the bf16 weights)")
    with torch.no_grad():
        if args.full:
            rows = bench_loop(full_model(device), args, device, torch.bfloat16, txt_len=512)
        else:
            rows = bench_pipeline(args, device)
    threads = torch.get_num_threads()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({threads} thread{'s' if threads > 1 else ''})"
    model = "random full-size FLUX.1-dev, bf16" if args.full else (args.weights or "built-in tiny checkpoint, fp32")
    head = (f"{datetime.date.today()}, {model}, {args.size}x{args.size}, {args.steps} steps, 1 image, default vital "
            f"layers ({'all 4 layers of the tiny 2+2 model' if tiny else 'FLUX.1'}), subject mask 30 %, median of "
            f"{args.repeats} alternating runs; torch {torch.__version__}")
    lines = [head, "",
             "| device | what | plain generate (s) | freecus (s) | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {what} | {p:.3f} | {f:.3f} | {f / p:.2f}x |" for what, p, f in rows]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record("FreeCus", text, INTRO)
        print(f"recorded in {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
