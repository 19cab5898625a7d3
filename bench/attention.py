"""Benchmark of the fused masked, λ-scaled reference attention kernel against what one would write otherwise.

    python bench/attention.py              # GPU: FLUX shapes at 512², 1024², 2048²; masks 100 %, 30 %, 0 %
    python bench/attention.py --record     # ... and add the table to bench/RESULTS.md
    python bench/attention.py --check      # GPU: bf16/fp16 correctness only (exit status 1 on failure)
    python bench/attention.py --sweep      # GPU: time launch configs at 1024², 30 % mask
    python bench/attention.py --smoke      # CPU: tiny shapes, triton through its interpreter, end-to-end run

Shapes are FLUX's joint attention with a reference image: B=1, 24 heads, D=128, bf16; queries = 512 text + N target
tokens, keys = R reference + 512 text + N target tokens (R = N: the reference has the target's resolution).
The reference mask is a centred disk covering 100 / 30 / 0 % of the reference tokens; mask_mode "exclude"
(FreeCus), λ_r = λ_p = 1.1. TFLOP/s = 4·B·H·Lq·Lk·D / time with Lk all keys (masked ones included).
Baselines (same run; timed: the attention call only, every per-mask and per-call input built beforehand —
the concatenated, λ-scaled K/V, the additive mask, the block mask; the cat they all need is timed separately):
  flash   SDPA, flash backend, on the concatenated keys with λ folded into K and no mask (speed reference:
          it ignores the mask, so it only computes the right thing at 100 %);
  sdpa+m  SDPA with an additive float mask (0 / -inf per key), what a user would write;
  flex    FlexAttention (torch.compile'd) with a score_mod for λ and a block_mask for the mask.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import warnings
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch
import torch.nn.functional as F

from minidit.attention import attention_reference
from minidit.kernels.ref_attention import ref_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, record  # noqa: E402

N_TXT = 512
SHAPES = {"512²": 1024, "1024²": 4096, "2048²": 16384}  # target image tokens (= reference tokens)
MASKS = (1.0, 0.3, 0.0)
LAMBDA = 1.1


def disk_mask(B: int, R: int, frac: float, device) -> torch.Tensor:
    """(B, R) bool: a centred disk covering `frac` of a square token grid (all / none at 1 / 0)."""
    if frac >= 1:
        return torch.ones(B, R, dtype=torch.bool, device=device)
    side = math.isqrt(R)
    assert side * side == R, "reference tokens must form a square grid"
    yy, xx = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    d2 = (yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2
    radius2 = frac * R / math.pi
    return (d2 <= radius2).reshape(1, R).expand(B, R).contiguous()


def make_inputs(B, H, N, R, D, dtype, device, n_txt=N_TXT, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Lq = n_txt + N

    def rnd(L):
        return torch.randn(B, H, L, D, generator=g).to(device=device, dtype=dtype)
    return rnd(Lq), rnd(Lq), rnd(Lq), rnd(R), rnd(R)


def baselines(q, k, v, rk, rv, mask, lam, n_txt, can_flash: bool, compile_flex: bool):
    """name -> zero-argument callable computing the same attention another way (inputs prepared here)."""
    B, H, Lq, D = q.shape
    R, Lk = rk.shape[2], k.shape[2]
    s = torch.ones(R + Lk, device=q.device, dtype=q.dtype)
    s[:R], s[R:R + n_txt] = lam, lam
    kcat = torch.cat([rk, k], 2) * s[:, None]  # (B, H, R + Lk, D), λ folded into K
    vcat = torch.cat([rv, v], 2)
    keep = torch.cat([mask, mask.new_ones(B, Lk)], 1)  # (B, R + Lk)
    add_mask = torch.zeros(B, 1, 1, R + Lk, device=q.device, dtype=q.dtype)
    add_mask = add_mask.masked_fill(~keep[:, None, None], -math.inf)  # 0 / -inf per key
    out = {}
    if can_flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, kcat, vcat)
        out["flash"] = flash
    out["sdpa+m"] = lambda: F.scaled_dot_product_attention(q, kcat, vcat, attn_mask=add_mask)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return out
    lam_t = torch.full((B,), lam, device=q.device, dtype=torch.float32)
    kc, vc = torch.cat([rk, k], 2), torch.cat([rv, v], 2)

    def score_mod(score, b, h, q_idx, kv_idx):
        scale = torch.where(kv_idx < R + n_txt, lam_t[b], 1.0)  # λ_r on R, λ_p on T (equal here), 1 on N
        return score * scale

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]
    block_mask = create_block_mask(mask_mod, B, None, Lq, R + Lk, device=q.device.type)
    flex = torch.compile(flex_attention) if compile_flex else flex_attention
    out["flex"] = lambda: flex(q, kc, vc, score_mod=score_mod, block_mask=block_mask)
    return out


def max_err(out, q, k, v, rk, rv, mask, lam, n_txt, rows: int = 1024) -> float:
    """bf16/fp16 output vs the fp32 reference, on a spread of query rows (the fp32 logits of all rows would not fit)."""
    Lq = q.shape[2]
    idx = torch.linspace(0, Lq - 1, min(rows, Lq)).round().long().unique().to(q.device)  # first and last row included
    ref = attention_reference(q[:, :, idx].float(), k.float(), v.float(), rk.float(), rv.float(), mask, lam, lam,
                              n_txt, "exclude")
    return (out[:, :, idx].float() - ref).abs().max().item()


def timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=25, rep=100)

    def cpu_time(fn):
        import time
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return cpu_time


def run(shapes: dict, masks, H, D, dtype, device, smoke: bool) -> list[dict]:
    bench = timer(device)
    rows = []
    for name, N in shapes.items():
        R = N
        q, k, v, rk, rv = make_inputs(1, H, N, R, D, dtype, device, n_txt=N_TXT if not smoke else 16)
        n_txt = q.shape[2] - N
        B, _, Lq, _ = q.shape
        flops = 4 * B * H * Lq * (R + k.shape[2]) * D
        t_cat = bench(partial(lambda a, b, c, d: (torch.cat([a, b], 2), torch.cat([c, d], 2)), rk, k, rv, v))
        for frac in masks:
            mask = disk_mask(B, R, frac, device)
            fused = partial(ref_attention, q, k, v, rk, rv, mask, LAMBDA, LAMBDA, n_txt, "exclude")
            out = fused()
            err = max_err(out, q, k, v, rk, rv, mask, LAMBDA, n_txt)
            t = bench(fused)
            row = dict(shape=f"{name} (Lq {Lq}, R {R})", mask=f"{frac:.0%}", real=f"{mask.float().mean().item():.1%}",
                       ms=t, tflops=flops / t / 1e9, err=err, cat_ms=t_cat)
            for bname, fn in baselines(q, k, v, rk, rv, mask, LAMBDA, n_txt, can_flash=device.type == "cuda",
                                       compile_flex=not smoke).items():
                try:
                    b_out = fn()
                    row[bname] = bench(fn)
                    if bname != "flash" or frac == 1.0:  # flash ignores the mask: only comparable at 100 %
                        row[bname + "_err"] = (b_out.float() - out.float()).abs().max().item()
                except Exception as e:  # a baseline that cannot run here is reported, not fatal
                    row[bname] = None
                    row[bname + "_why"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            rows.append(row)
            print(fmt_row(row), flush=True)
    return rows


HEADER = ("| shape | mask (real) | triton ms | TFLOP/s | max err vs fp32 | flash ms | speed-up vs flash | sdpa+m ms "
          "| speed-up vs sdpa+m | flex ms | speed-up vs flex | K/V cat ms | baselines max diff |")


def fmt_row(r: dict) -> str:
    def ms(key):
        return "n/a" if r.get(key) is None else f"{r[key]:.3f}"

    def ratio(key):
        return "n/a" if r.get(key) is None else f"{r[key] / r['ms']:.2f}×"
    diffs = [r[k] for k in r if k.endswith("_err") and k != "err"]
    diff = f"{max(diffs):.2e}" if diffs else "n/a"
    return (f"| {r['shape']} | {r['mask']} ({r['real']}) | {r['ms']:.3f} | {r['tflops']:.3g} | {r['err']:.2e} | "
            f"{ms('flash')} | {ratio('flash')} | {ms('sdpa+m')} | {ratio('sdpa+m')} | {ms('flex')} | {ratio('flex')} "
            f"| {r['cat_ms']:.3f} | {diff} |")


def table(rows, title: str) -> str:
    lines = [title, "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [fmt_row(r) for r in rows]
    lines += ["", "speed-up = baseline time / triton time; baselines max diff = largest |baseline − triton| "
              "(flash ignores the mask, so it is compared at 100 % only)."]
    notes = sorted({f"{k[:-4]}: {r[k]}" for r in rows for k in r if k.endswith("_why")})
    if notes:
        lines += [""] + [f"- baseline not run: {n}" for n in notes]
    return "\n".join(lines) + "\n"


def check(device) -> bool:
    """Correctness on the GPU in bf16 and fp16, both mask modes, odd lengths, per-batch λ and masks."""
    ok = True
    g = torch.Generator(device="cpu").manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        for D in (64, 128):
            B, H, Lq, Lk, R, n_txt = 2, 3, 1000, 1111, 777, 77
            q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
            rk, rv = (torch.randn(B, H, R, D, generator=g).to(device, dtype) for _ in range(2))
            mask = torch.rand(B, R, generator=g).to(device) < torch.tensor([[0.3], [0.8]], device=device)
            mask[0, :300] = False  # whole blocks skipped for item 0
            lr = torch.tensor([1.1, 0.8], device=device)
            lp = torch.tensor([1.2, 0.9], device=device)
            for mode in ("exclude", "zero"):
                out = ref_attention(q, k, v, rk, rv, mask, lr, lp, n_txt, mode)
                ref = attention_reference(q.float(), k.float(), v.float(), rk.float(), rv.float(), mask, lr, lp,
                                          n_txt, mode)
                err = (out.float() - ref).abs().max().item()
                good = err <= 2e-2
                ok &= good
                print(f"check {str(dtype):15s} D={D:3d} {mode:8s} max abs err {err:.2e} {'ok' if good else 'FAIL'}")
    from minidit.attention import auto_backend
    auto = auto_backend(torch.zeros(1, 1, 1, 128, device=device, dtype=torch.bfloat16))
    print(f"check automatic backend on {device} bf16 D=128: {auto} {'ok' if auto == 'triton' else 'FAIL'}")
    return ok and auto == "triton"


def sweep(device) -> None:
    bench = timer(device)
    N = SHAPES["1024²"]
    q, k, v, rk, rv = make_inputs(1, 24, N, N, 128, torch.bfloat16, device)
    mask = disk_mask(1, N, 0.3, device)
    res = []
    call = partial(ref_attention, q, k, v, rk, rv, mask, LAMBDA, LAMBDA, N_TXT, "exclude")
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for w in (4, 8):
                for st in (2, 3, 4):
                    cfg = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                    try:
                        t = bench(partial(call, **cfg))
                    except Exception as e:  # out of shared memory / registers
                        print(cfg, "failed:", type(e).__name__)
                        continue
                    res.append((t, cfg))
                    print(f"{t:.3f} ms  {cfg}", flush=True)
    print("best:", min(res, key=lambda x: x[0]) if res else None)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU end-to-end run on tiny shapes (triton interpreter)")
    ap.add_argument("--record", action="store_true", help="add the table to bench/RESULTS.md")
    ap.add_argument("--check", action="store_true", help="GPU correctness only")
    ap.add_argument("--sweep", action="store_true", help="GPU: time launch configs")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.smoke:
        device = torch.device("cpu")
        gpu = "CPU (triton interpreter; times are not meaningful)"
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        rows = run({"tiny 8×8": 64}, MASKS, H=2, D=64, dtype=torch.float32, device=device,
                   smoke=True)
    else:
        if not cuda:
            sys.exit("no CUDA device: the benchmark needs a GPU (use --smoke for the CPU end-to-end run)")
        device = torch.device("cuda")
        if args.check:
            sys.exit(0 if check(device) else 1)
        if args.sweep:
            sweep(device)
            return []
        gpu = torch.cuda.get_device_name()
        rows = run(SHAPES, MASKS, H=24, D=128, dtype=torch.bfloat16, device=device, smoke=False)
    title = (f"### {gpu}, torch {torch.__version__}, {datetime.date.today()}"
             + (" (smoke run)" if args.smoke else ""))
    text = table(rows, title)
    print("\n" + text)
    if args.record:
        record("Attention kernel", text)
        print(f"recorded in {RESULTS}")
    return rows


if __name__ == "__main__":
    main()
