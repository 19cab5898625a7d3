"""Inpainting / outpainting: how well the preserved region is kept, with and without minidit's latent blend.

    python bench/edit_blend.py                        # CPU, the random tiny checkpoint (weights/tiny.py)
    python bench/edit_blend.py --weights PATH         # any FLUX.1 folder (e.g. a trained tiny model)
    python bench/edit_blend.py --image photo.png      # your own picture (resized to --size), else a synthetic one
    ... --record                                      # add the table to "Editing: latent blend" in RESULTS.md

For each edit, four runs with the same image, mask, prompt and seed: the "paper" preset (τ = 0.1 step fraction,
blend on), the same with `blend=False`, the "official" preset (the released gradio demo: τ = 50 on the shifted
time, no blend; the VAE posterior mean here, so that only the method differs) and official with `blend=True`.
Reported over the preserved pixels (inpainting: where the edit mask is 0; outpainting: the pasted area): PSNR
(dB, pixels in [0, 1]) and mean absolute difference (/255) of the output against the input image and against its
VAE reconstruction decode(encode(image)) (what a perfect keep produces through the autoencoder), and the PSNR of
that reconstruction against the input (the ceiling any method can reach).
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record

INTRO = """`bench/edit_blend.py`: how well inpainting/outpainting keep the preserved region, with and without the
latent blend (`blend`, on in the "paper" preset, off in "official": neither the paper nor the released code
blends). Over the preserved pixels: PSNR (dB) and mean |Δ| (/255) of the output against the input and against
the input's VAE reconstruction decode(encode(input)) (what a perfect keep gives through the autoencoder); "VAE
ceiling" = that reconstruction against the input, the best any method can do. Same image, mask, prompt, seed
and steps in every row; "official" uses the VAE posterior mean here (`vae_sample=False`) so that only the
method differs. On a random tiny checkpoint the model's own velocity is noise, so without the blend the
preserved region drifts far from the input; the numbers to trust come from a trained model
(`python bench/edit_blend.py --weights PATH --record`)."""


def synthetic(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, max(2, size // 32), max(2, size // 32), generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    return (((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1)


def pixels(img) -> torch.Tensor:
    """PIL image -> (3, H, W) float in [0, 1]."""
    from minidit.image import pil_to_tensor
    return (pil_to_tensor(img)[0] + 1) / 2


def region_stats(out: torch.Tensor, ref: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, mean |Δ| in /255) over the pixels where region > 0."""
    m = region.bool()
    d = (out - ref)[:, m]
    mse = float((d ** 2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(1 / mse)), float(d.abs().mean()) * 255


def run(args) -> str:
    from minidit.regions import outpaint_canvas
    from minidit.pipeline import Pipeline
    if args.weights is None:  # the random tiny checkpoint (explicitly: Pipeline.load(None) may be a trained one)
        from minidit.weights.tiny import tiny_repo
        pipe = Pipeline.load(tiny_repo(), device=args.device)
    else:
        pipe = Pipeline.load(args.weights, device=args.device)
    S = args.size
    if args.image:
        from minidit.image import load_image, pil_to_tensor
        x = pil_to_tensor(load_image(args.image, (S, S)))[0]
    else:
        x = synthetic(S)
    rows = []
    # inpainting: an off-grid ellipse covering ~30 % of the image is repainted
    yy, xx = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    edit = ((((yy - 0.47 * S) / (0.33 * S)) ** 2 + ((xx - 0.53 * S) / (0.29 * S)) ** 2) <= 1).float()
    # outpainting: the image shrunk to half size, pasted at an off-grid offset on the S x S canvas
    half = torch.nn.functional.interpolate(x[None], size=(S // 2, S // 2), mode="bilinear", antialias=True)[0]
    half = ((half.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    off_fit = (S // 4 // 16 * 16, S // 4 // 16 * 16)
    cases = [("inpaint", x, 1 - edit, dict(fn=pipe.inpaint, args=(x, edit, args.prompt)))]
    for name, off in (("outpaint", off_fit),):
        canvas, area = outpaint_canvas(half, (S, S), off, "fit")
        cases.append((name, canvas, area, dict(fn=pipe.outpaint, args=(half, args.prompt, (S, S)),
                                               extra=dict(offset=off))))
    variants = [("paper (blend on)", dict(preset="paper")), ("paper, blend=False", dict(preset="paper", blend=False)),
                ("official (no blend)", dict(preset="official", vae_sample=False)),
                ("official, blend=True", dict(preset="official", vae_sample=False, blend=True))]
    for name, target, region, call in cases:
        tgt = (target + 1) / 2
        vae = pixels(pipe.decode(pipe.encode_image(target[None]), S, S)[0])
        ceiling, _ = region_stats(vae, tgt, region)
        for label, kw in variants:
            img = pixels(call["fn"](*call["args"], steps=args.steps, seed=args.seed, **call.get("extra", {}), **kw)[0])
            psnr, mad = region_stats(img, tgt, region)
            psnr_vae, mad_vae = region_stats(img, vae, region)
            rows.append((name, label, psnr, ceiling, mad, psnr_vae, mad_vae))
    lines = ["| edit | preset | PSNR vs input dB | VAE ceiling dB | mean |Δ| vs input /255 | PSNR vs VAE "
             "reconstruction dB | mean |Δ| vs VAE reconstruction /255 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e} | {v} | {p:.2f} | {c:.2f} | {m:.2f} | {pv:.2f} | {mv:.2f} |" for e, v, p, c, m, pv, mv in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="FLUX.1 folder (default: the random tiny checkpoint)")
    ap.add_argument("--image", default=None, help="input picture (default: a synthetic smooth one)")
    ap.add_argument("--prompt", default="a small stone castle on a green hill")
    ap.add_argument("--size", type=int, default=None, help="pixels, multiple of 32 (default 256 tiny, 1024 else)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--record", action="store_true", help='append the table to "Editing: latent blend" in RESULTS.md')
    args = ap.parse_args()
    args.size = args.size or (1024 if args.weights else 256)
    if args.size % 32:
        sys.exit("--size must be a multiple of 32")
    with torch.no_grad():
        text = run(args)
    print(text)
    if args.record:
        what = args.weights or "random tiny checkpoint (weights/tiny.py)"
        record("Editing: latent blend", f"### {what}, {args.size}², {args.steps} steps, seed {args.seed}, "
               f"torch {torch.__version__}, {datetime.date.today()}\n\n{text}", intro=INTRO)


if __name__ == "__main__":
    main()
