"""What the FLUX.1 family adds to one denoising step, on CPU at full width (3072, 24 heads) with few blocks.

    python bench/family.py [--size 512] [--txt 512] [--repeats 3] [--threads 2] [--record]

Fill and Depth/Canny differ from dev only in img_in's input width (384 / 128 instead of 64: family.py); Kontext
appends the reference's tokens to the image sequence (here a reference of the output's size: N more tokens).
Rows: one forward of a 1 double + 1 single block model (random weights, fp32, SDPA) per variant, each alternated
with the dev forward (min / median of --repeats after one warm-up each); the ratio is of the medians. The last
column estimates a full 19 + 38 block step: the small forward plus 18 more double and 37 more single blocks, one block of
each kind timed alone at dev's and at Kontext's sequence length, the two alternated (the same blocks serve every
variant: only the length differs).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, record  # noqa: E402

from minidit import sampling  # noqa: E402
from minidit.attention import backend  # noqa: E402
from minidit.rope import embed_nd  # noqa: E402
from minidit.transformer import Flux, FluxConfig  # noqa: E402

VARIANTS = {"dev": (64, 1), "fill": (384, 1), "control (Depth/Canny)": (128, 1), "kontext (1 reference)": (64, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="output side in pixels (default 512: 1024 tokens)")
    ap.add_argument("--txt", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    cfg = FluxConfig(depth=1, depth_single_blocks=1)
    model = Flux(cfg).eval()
    h = cfg.hidden_size
    img_ins = {w: torch.nn.Linear(w, h) for w, _ in VARIANTS.values()}
    N = (a.size // 16) ** 2
    txt, vec = torch.randn(1, a.txt, 4096), torch.randn(1, 768)
    txt_ids, t, g = sampling.text_ids(1, a.txt), torch.full((1,), 0.5), torch.full((1,), 3.5)

    def inputs(width: int, copies: int):
        ids = sampling.image_ids(1, a.size, a.size)
        ids = torch.cat([ids] + [ids.clone().index_fill_(2, torch.tensor([0]), float(k)) for k in range(1, copies)], 1)
        return torch.randn(1, copies * N, width), ids

    def forward(width: int, copies: int):
        img, ids = inputs(width, copies)

        def run():
            model.img_in = img_ins[width]
            with torch.no_grad():
                return model(img, ids, txt, txt_ids, t, vec, g)[:, :N]  # (Kontext's prediction cut to N)
        return run

    def blocks(copies: int):
        """One double and one single block at this image sequence length."""
        img, ids = inputs(64, copies)
        x_img, x_txt = torch.randn(1, img.shape[1], h), torch.randn(1, a.txt, h)
        v = torch.randn(1, h)
        pe = embed_nd(torch.cat((txt_ids, ids), 1), cfg.axes_dim, cfg.theta)
        return (lambda: model.double_blocks[0](x_img, x_txt, v, pe),
                lambda: model.single_blocks[0](torch.cat((x_txt, x_img), 1), v, pe, a.txt))

    (d1, s1), (d2, s2) = blocks(1), blocks(2)
    with torch.no_grad():  # the two lengths alternated, so that a change in machine load hits both alike
        (td1, td2), (ts1, ts2) = alternate(d1, d2, a.repeats, cuda=False), alternate(s1, s2, a.repeats, cuda=False)
    med = statistics.median
    per_block = {1: (med(td1), med(ts1)), 2: (med(td2), med(ts2))}
    dev = forward(64, 1)
    rows = []
    for name, (width, copies) in VARIANTS.items():
        base, ours = alternate(dev, forward(width, copies), a.repeats, cuda=False)
        bd, bs = per_block[copies]
        d0, o0 = statistics.median(base), statistics.median(ours)
        full_dev = d0 + 18 * per_block[1][0] + 37 * per_block[1][1]
        full = o0 + 18 * bd + 37 * bs
        rows.append(f"| {name} | {width} | {a.txt} + {copies * N} | {min(base) * 1e3:.0f} / {d0 * 1e3:.0f} | "
                    f"{min(ours) * 1e3:.0f} / {o0 * 1e3:.0f} | {o0 / d0:.3f} | {full / full_dev:.3f} |")
        print(rows[-1], flush=True)
    head = (f"### {datetime.date.today()}: {a.size}x{a.size} ({N} image tokens), {a.txt} text tokens, CPU fp32, "
            f"{a.threads} threads, attention {backend()}, 1 double + 1 single block at full width; load average "
            f"{os.getloadavg()[0]:.1f} at the end (a shared machine)\n\n"
            "| variant | img_in width | sequence (text + image) | dev ms min / median | variant ms min / median | "
            "ratio (1+1 blocks) | est. ratio, 19+38 blocks |\n|---|---|---|---|---|---|---|")
    table = head + "\n" + "\n".join(rows)
    print(table)
    if a.record:
        record("The FLUX.1 family: cost of a step (bench/family.py)", table, intro=__doc__.split("\n\n", 2)[2])


if __name__ == "__main__":
    main()
