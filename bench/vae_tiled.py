"""Tiled VAE decode on CPU: minidit untiled vs minidit tiled vs diffusers' AutoencoderKL with enable_tiling().

    python bench/vae_tiled.py [--size 512] [--ch 32] [--tile 256] [--repeats 3] [--record]

One random-weight FLUX-shaped autoencoder (4 levels, 16 latent channels, widths ch x (1, 2, 4, 4), 2 ResnetBlocks
per encoder level: FLUX's own shape with ch=128; the default ch=32 keeps a --record run within minutes on a
shared 2-core CPU), loaded into minidit and, through diffusers' own BFL->diffusers converter, into diffusers
0.42.1's AutoencoderKL. Decodes one random (1, 16, size/8, size/8) latent, fp32, under no_grad:
  untiled         minidit `ae.decode(z)`, the baseline;
  minidit tiled   `ae.decode(z, tile=TILE)` (exact: whole-image GroupNorm statistics);
  diffusers tiled `vae.enable_tiling()` with tile_sample_min_size=TILE (per-tile statistics and attention,
                  overlaps blended: not exact).
Time: min / median of `--repeats` calls of each, round-robin after one warm-up each, in one process. Memory above
the weights and input, each case in a fresh process (as bench/step_cpu.py): the exact peak of live tensors
created during the decode, and the RSS high-water mark above the RSS before it. Error: max abs difference from
the untiled output (diffusers untiled is shown as a check that both hold the same weights).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402
from step_cpu import fresh_process, peaks  # noqa: E402

CASES = ("untiled", "minidit tiled", "diffusers tiled")


def models(ch: int, tile: int):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from minidit.autoencoder import AutoEncoder, AutoEncoderConfig
    from minidit.weights.tiny_ae import diffusers_config, tiny_ae_state_dict
    cfg = AutoEncoderConfig(ch=ch)
    sd = tiny_ae_state_dict(cfg, seed=0)
    ae = AutoEncoder(cfg)
    ae.load_state_dict(sd)
    dcfg = diffusers_config(cfg)
    vae = AutoencoderKL.from_config(dcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dcfg), strict=True)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // ae.factor  # overlap factor: its 0.25
    return ae.eval().requires_grad_(False), vae.eval().requires_grad_(False), cfg


def calls(a):
    ae, vae, cfg = models(a.ch, a.tile)
    z = torch.randn(1, cfg.z_channels, a.size // ae.factor, a.size // ae.factor, generator=torch.Generator().manual_seed(1))
    zd = z / cfg.scale_factor + cfg.shift_factor  # what FluxPipeline hands diffusers' vae.decode
    fns = {"untiled": lambda: ae.decode(z), "minidit tiled": lambda: ae.decode(z, tile=a.tile),
           "diffusers tiled": lambda: vae.decode(zd).sample}

    def diffusers_untiled():
        vae.use_tiling = False
        try:
            return vae.decode(zd).sample
        finally:
            vae.use_tiling = True
    return fns, diffusers_untiled


def child(a) -> None:
    """One case in this (fresh) process: print its memory figures as JSON."""
    print(json.dumps(peaks(calls(a)[0][a.child])))


def memory(a, case: str) -> dict:
    return fresh_process([sys.executable, __file__, "--child", case, "--size", str(a.size), "--ch", str(a.ch),
                          "--tile", str(a.tile)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--ch", type=int, default=32, help="base width (FLUX: 128)")
    ap.add_argument("--tile", type=int, default=256, help="tile side in output pixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    mem = {c: memory(a, c) for c in CASES}
    fns, diffusers_untiled = calls(a)
    times = {c: [] for c in CASES}
    with torch.no_grad():
        out = {c: fn() for c, fn in fns.items()}  # warm-up, and the outputs compared below
        err = {c: (out[c] - out["untiled"]).abs().max().item() for c in CASES}
        err["diffusers untiled"] = (diffusers_untiled() - out["untiled"]).abs().max().item()
        del out
        for _ in range(a.repeats):
            for c, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[c].append(time.perf_counter() - t0)

    mib, base = 2 ** 20, statistics.median(times["untiled"])
    rows = []
    for c in CASES:
        m, u, t = mem[c], mem["untiled"], statistics.median(times[c])
        rows.append(f"| {c} | {min(times[c]):.2f} / {t:.2f} | {t / base:.2f}x | {m['live'] / mib:.0f} "
                    f"({m['live'] / u['live']:.2f}x) | {m['rss'] / mib:.0f} ({m['rss'] / max(u['rss'], 1):.2f}x) | "
                    + ("-" if c == "untiled" else f"{err[c]:.2e}") + " |")
    header = (f"CPU ({torch.get_num_threads()} threads, shared machine), torch {torch.__version__}, decode of one "
              f"(1, 16, {a.size // 8}, {a.size // 8}) latent -> {a.size}² image, widths {a.ch} x (1, 2, 4, 4), fp32, "
              f"tile {a.tile}, random weights; diffusers untiled vs untiled: max abs diff {err['diffusers untiled']:.2e}")
    table = f"{HEADER}\n" + "\n".join(rows)
    print(table)
    print(header)
    if a.record:
        record("Tiled VAE decode (bench/vae_tiled.py)", f"### {header}\n\n{table}",
               intro="`python bench/vae_tiled.py --record`: minidit's exact tiled decode against its untiled "
                     "decode and diffusers 0.42.1 `AutoencoderKL.enable_tiling()`, same random weights. Time min / "
                     "median of round-robin calls; memory above the weights and input, each case in a fresh "
                     "process: exact live-tensor peak and RSS high-water mark; error: max abs vs untiled.")


HEADER = ("| case | s min / med | time vs untiled (medians) | live peak MiB (vs untiled) | RSS peak MiB (vs untiled) "
          "| max abs err vs untiled |\n|---|---|---|---|---|---|")


if __name__ == "__main__":
    main()
