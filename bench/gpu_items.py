"""The four measurements of bench/gpu.py. Each takes the run's `Ctx` (gpu_models.py) and a `Table` it fills row by
row, so that a time-out or an error keeps the rows already measured. The helpers of bench/attention.py and
bench/step.py are reused, not copied.
"""
from __future__ import annotations

import gc
import time
from functools import partial

import torch
import torch.nn.functional as F

import attention as attn_bench  # bench/attention.py
import step as step_bench       # bench/step.py
from gpu_models import GiB, PROMPT, Table, compiled_blocks, flux_flops, fmt, pipeline, rel_err, seconds, sync
from minidit import Reference, sampling
from minidit.attention import attention, attention_reference
from minidit.freecus import DEFAULT_STEPS as FREECUS_STEPS
from minidit.kernels.ref_attention import ref_attention

LAMBDA_REF, LAMBDA_TXT = 1.15, 0.9   # λ_r != λ_p != 1: a swapped or missing segment scale shows
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}  # relative L2 error vs fp32


# ------------------------------------------------------------------------------------------------- 1. kernel

def kernel_correctness(ctx, t: Table) -> bool:
    """The fused kernel in each 16-bit dtype, both mask modes, masks 100/30/0 %, λ_r != λ_p != 1, on a FLUX shape,
    against the fp32 reference on a spread of query rows; also that minidit.attention dispatches to it on CUDA."""
    H, D, N = ctx.heads, ctx.head_dim, ctx.check_tokens
    worst, failed = {}, []
    inputs = attn_bench.make_inputs(1, H, N, N, D, torch.float32, ctx.device, n_txt=ctx.n_txt, seed=7)
    rows = torch.linspace(0, N + ctx.n_txt - 1, min(512, N + ctx.n_txt)).round().long().unique().to(ctx.device)
    for dtype in ctx.check_dtypes:
        q, k, v, rk, rv = (x.to(dtype) for x in inputs)
        for mode in ("exclude", "zero"):
            for frac in attn_bench.MASKS:
                mask = attn_bench.disk_mask(1, N, frac, ctx.device)
                out = ref_attention(q, k, v, rk, rv, mask, LAMBDA_REF, LAMBDA_TXT, ctx.n_txt, mode)
                ref = attention_reference(q[:, :, rows].float(), k.float(), v.float(), rk.float(), rv.float(), mask,
                                          LAMBDA_REF, LAMBDA_TXT, ctx.n_txt, mode)  # the rounded inputs, in fp32
                err = rel_err(out[:, :, rows], ref)
                good = bool(torch.isfinite(out).all()) and err <= TOLERANCE[dtype]
                via = attention(q, k, v, ref_k=rk, ref_v=rv, ref_mask=mask, lambda_ref=LAMBDA_REF,
                                lambda_txt=LAMBDA_TXT, n_txt=ctx.n_txt, mask_mode=mode)
                dispatched = torch.equal(via, out.transpose(1, 2).reshape(via.shape))
                name = f"{str(dtype)[6:]} {mode} {frac:.0%}"
                print(f"check {name}: rel err {err:.2e} (tol {TOLERANCE[dtype]:g}), max abs "
                      f"{(out[:, :, rows].float() - ref).abs().max().item():.2e}, minidit.attention -> "
                      f"{'the kernel' if dispatched else 'another backend'}: {'ok' if good else 'FAIL'}", flush=True)
                worst[dtype] = max(worst.get(dtype, 0.0), err)
                if not good:
                    failed.append(f"{name} rel err {err:.1e}")
                if ctx.cuda and not dispatched:
                    t.notes.append(f"minidit.attention did not dispatch {name} to the kernel on CUDA")
    n = len(ctx.check_dtypes) * 2 * len(attn_bench.MASKS)
    t.notes.insert(0, f"correctness ({N} image + {ctx.n_txt} text tokens, {N} reference tokens, {H} heads, D {D}, "
                      f"λ_r {LAMBDA_REF}, λ_p {LAMBDA_TXT}, both mask modes, masks 100/30/0 %): "
                      + (f"{len(failed)} of {n} FAILED: {'; '.join(failed)}" if failed else f"{n} of {n} ok")
                      + "; worst relative L2 error vs fp32: "
                      + ", ".join(f"{str(d)[6:]} {e:.1e} (tol {TOLERANCE[d]:g})" for d, e in worst.items()))
    return not failed


def cudnn_baseline(q, k, v):
    """SDPA through the cuDNN backend, unmasked (bench/attention.py's `flash` with the other fused backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)
    return cudnn


def timer(ctx):
    """Milliseconds of one call: the median of triton's do_bench on CUDA, one call on the CPU (smoke)."""
    if not ctx.cuda:
        return attn_bench.timer(ctx.device)
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_item(ctx, t: Table) -> None:
    if not kernel_correctness(ctx, t):
        t.status = "FAILED: kernel correctness"
        t.notes.append("kernel correctness failed: the speed part was not run")
        t.readme.append("fused kernel: **correctness check FAILED** on this GPU (speed not measured)")
        return
    bench, peak = timer(ctx), ctx.peak
    for name, N in ctx.attn_shapes.items():
        if ctx.left() < 20:
            t.notes.append(f"time budget: shapes from {name} on not run")
            break
        q, k, v, rk, rv = attn_bench.make_inputs(1, ctx.heads, N, N, ctx.head_dim, ctx.dtype, ctx.device,
                                                 n_txt=ctx.n_txt)
        Lq = q.shape[2]
        flops = 4 * ctx.heads * Lq * (N + k.shape[2]) * ctx.head_dim  # masked keys counted
        for frac in attn_bench.MASKS:
            mask = attn_bench.disk_mask(1, N, frac, ctx.device)
            fns = {"triton": partial(ref_attention, q, k, v, rk, rv, mask, attn_bench.LAMBDA, attn_bench.LAMBDA,
                                     ctx.n_txt, "exclude")}
            fns |= attn_bench.baselines(q, k, v, rk, rv, mask, attn_bench.LAMBDA, ctx.n_txt, can_flash=ctx.cuda,
                                        compile_flex=not ctx.smoke)
            if ctx.cuda and frac == 1:
                kc, vc = torch.cat([rk, k], 2) * attn_bench.LAMBDA, torch.cat([rv, v], 2)  # as flash is timed
                fns["cudnn"] = cudnn_baseline(q, kc, vc)
            ms = {}
            for impl, fn in fns.items():
                if impl in ("flash", "cudnn") and frac < 1:
                    continue  # they ignore the mask: timed once per shape, on the unmasked row
                try:
                    ms[impl] = bench(fn)
                except Exception as e:  # a baseline that cannot run here is reported, not fatal
                    t.notes.append(f"{impl} at {name} {frac:.0%}: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
            tri = ms.get("triton")
            tf = flops / tri / 1e9 if tri else None
            t.rows.append([f"{name} (Lq {Lq}, keys {N + k.shape[2]})", f"{frac:.0%}", fmt(tri, ".3f"), fmt(tf, ".0f"),
                           fmt(100 * tf / peak if tf and peak else None, ".0f"),
                           *(fmt(ms.get(b), ".3f", "—") for b in ("flash", "cudnn", "sdpa+m", "flex"))])
            if name == "1024²" and frac == 0.3 and tri:
                t.readme.append(f"fused kernel at 1024², 30 % mask: {tri:.2f} ms, speed-up "
                                f"{fmt(ms.get('flex') and ms['flex'] / tri, '.2f')}× over compiled FlexAttention, "
                                f"{fmt(ms.get('sdpa+m') and ms['sdpa+m'] / tri, '.2f')}× over SDPA with a float mask")
            if name == "1024²" and frac == 1.0 and tri:
                best = min((ms[b], b) for b in ("flash", "cudnn") if b in ms) if {"flash", "cudnn"} & set(ms) else None
                t.readme.append(f"fused kernel at 1024², unmasked: {tri:.2f} ms ({tf:.0f} TFLOP/s"
                                + (f", {100 * tf / peak:.0f} % of bf16 peak" if peak else "") + ")"
                                + (f"; SDPA {best[1]} {best[0]:.2f} ms" if best else ""))
        del q, k, v, rk, rv
    t.notes.append("TFLOP/s = 4·H·Lq·keys·D / time with every reference key counted (masked ones too); flash and "
                   "cuDNN ignore the mask, so they are timed on the 100 % row only; λ_r = λ_p = 1.1, mode exclude")


# --------------------------------------------------------------------------------------------------- 2. step

def step_item(ctx, t: Table) -> None:
    try:
        step_compare(ctx, t)
    finally:  # the other items need the memory
        ctx.cache.pop("diffusers", None)
        torch._dynamo.reset()


def step_compare(ctx, t: Table) -> None:
    cfg, cuda = ctx.cfg, ctx.cuda
    ours = ctx.flux(with_diffusers=True)
    theirs = ctx.cache.get("diffusers")
    g = torch.Generator(ctx.device).manual_seed(1)
    run_ours, run_theirs, N = step_bench.model_calls(ours, theirs, cfg, ctx.size, ctx.n_txt, ctx.device,
                                                     ctx.dtype, g)
    flops = flux_flops(cfg, N, ctx.n_txt)
    floor = flops / (ctx.peak * 1e12) if ctx.peak else None
    t.notes.append(f"FLOPs per step = {cfg.n_layers} blocks × [2·L·(4h² + 2h·m) + 4·L²·h] + in/out projections = "
                   f"{flops / 1e12:.2f} TFLOP (L = {N} image + {ctx.n_txt} text tokens, h = {cfg.hidden_size}, "
                   f"m = {int(cfg.hidden_size * cfg.mlp_ratio)}); physical limit at the bf16 peak: "
                   + (f"{floor * 1e3:.1f} ms" if floor else "n/a (peak unknown)"))
    if theirs is None:
        t.notes.append(f"no diffusers model: minidit alone ({ctx.cache.get('diffusers_why', '')})")
    iters, warm = ctx.step_iters
    times = {}

    def row(model, mode, fn, ref_out):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = fn()
            sync(ctx)
            first = time.perf_counter() - t0
            sec = step_bench.timeit(fn, iters, warm, cuda)
        times[(model, mode)] = sec
        tf = flops / sec / 1e12
        check = "" if ref_out is None else f"rel diff {rel_err(out, ref_out):.1e}"
        t.rows.append([model, mode, f"{sec * 1e3:.1f}", f"{tf:.0f}", fmt(ctx.peak and 100 * tf / ctx.peak, ".0f"),
                       "—", f"{first:.1f}", check])
        return out

    try:  # minidit's compiled row before diffusers': if the budget runs out, ours is the one measured
        with torch.no_grad():
            ref = run_theirs() if theirs is not None else None
        if theirs is not None:
            row("diffusers", "eager", run_theirs, None)
        out = row("minidit", "eager", run_ours, ref)
        if ref is not None and rel_err(out, ref) > ctx.agree:
            t.status = "FAILED: outputs differ"
        ref = ref if ref is not None else out
        with compiled_blocks(ours, ("double_blocks", "single_blocks"), ctx.compile_backend):
            row("minidit", "compiled", run_ours, ref)
        if theirs is not None:
            with compiled_blocks(theirs, ("transformer_blocks", "single_transformer_blocks"), ctx.compile_backend):
                row("diffusers", "compiled", run_theirs, ref)
    finally:
        for r in t.rows:
            base = times.get(("diffusers", r[1]))
            r[5] = fmt(base and times[(r[0], r[1])] / base, ".2f", "—")
    parts = [f"{model} {mode} {times[(model, mode)] * 1e3:.0f} ms" for model, mode in
             (("minidit", "eager"), ("diffusers", "eager"), ("minidit", "compiled"), ("diffusers", "compiled"))
             if (model, mode) in times]
    best = min(v for (m, _), v in times.items() if m == "minidit")
    t.readme.append(f"full-size FLUX.1-dev step at 1024², bf16: {', '.join(parts)}; physical limit "
                    + (f"{floor * 1e3:.0f} ms ({flops / 1e12:.1f} TFLOP at the bf16 peak): minidit's best is "
                       f"{100 * floor / best:.0f} % of it" if floor else "unknown (no peak for this device)"))
    t.notes.append("compiled = each block through torch.compile (regional; the first-call column includes the "
                   f"compile); rel diff = ‖out − diffusers eager‖ / ‖diffusers eager‖ (agree below {ctx.agree:g})")


# ------------------------------------------------------------------------------------------------ 3. methods

def methods_item(ctx, t: Table) -> None:
    """Cost per image of plain generation, Personalize Anything and FreeCus ("paper" presets, one 30 % reference
    box) through the public entry points with random full-size weights, latents out (no decode). Two step counts
    s1 < s2 give per step = (t2 - t1) / (s2 - s1) and fixed = t1 - s1·per step (text encoders, VAE-encoding the
    reference); per image = fixed + n·per step at the method's default n, loop per image = n·per step."""
    pipe = pipeline(ctx)
    S = ctx.size
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(S, S)
    mask[S // 4: 3 * S // 4, S // 5: 4 * S // 5] = 1
    ref = Reference(torch.rand(3, S, S, generator=gen) * 2 - 1, mask)
    kw = dict(height=S, width=S, seed=0, return_latents=True)
    methods = [("plain generate", pipe.default_steps, lambda n: pipe.generate(PROMPT, steps=n, **kw)),
               ("Personalize Anything", pipe.default_steps, lambda n: pipe.personalize(PROMPT, ref, steps=n, **kw)),
               ("FreeCus", FREECUS_STEPS[pipe.variant], lambda n: pipe.freecus(PROMPT, ref, "a toy car", steps=n, **kw))]
    s1, s2 = ctx.method_steps
    plain = None
    for name, n, call in methods:
        with torch.no_grad():
            call(s1)  # warm-up: kernels compiled, caches filled
            t1, t2 = seconds(ctx, partial(call, s1)), seconds(ctx, partial(call, s2))
        per_step = (t2 - t1) / (s2 - s1)
        fixed = t1 - s1 * per_step
        loop = n * per_step
        plain = loop if plain is None else plain
        t.rows.append([name, str(n), f"{t1:.2f} / {t2:.2f}", f"{per_step * 1e3:.0f}", f"{fixed:.2f}",
                       f"{fixed + loop:.1f}", f"{loop:.1f}", f"{loop / plain:.2f}×"])
        t.readme.append(f"{name} at {S}², {n} steps: {fixed + loop:.1f} s per image ({loop:.1f} s denoising"
                        + (f", {loop / plain:.2f}× plain generation)" if name != "plain generate" else ")"))
    t.notes.append(f"timed at {s1} and {s2} steps (one call each after a warm-up call); per image extrapolated "
                   "linearly to the default steps. With the paper presets every step costs about the same (Personalize "
                   "Anything: γ = 1 inversion makes no model call and the reference stays in the batch at every step, "
                   "only the split between replace and concat steps moves with the count; FreeCus: the reference runs "
                   "to the last vital layer at every step). Fixed part: T5/CLIP (random weights, fixed random token "
                   "ids) and VAE-encoding the reference; no VAE decode")


# ------------------------------------------------------------------------------------------------- 4. memory

def phases(ctx, pipe) -> list[float | None]:
    """Peak GPU memory (GiB) of: resident before, encode_prompt, one denoising step, VAE decode."""
    def peak_of(fn):
        sync(ctx)
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        out = fn()
        sync(ctx)
        return out, (torch.cuda.max_memory_allocated() / GiB if ctx.cuda else None)
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / GiB if ctx.cuda else None
    S = ctx.size
    with torch.no_grad():
        (txt, txt_ids, vec), p_text = peak_of(lambda: pipe.encode_prompt([PROMPT]))
        img = sampling.noise(1, S, S, 0, ctx.device, ctx.dtype)
        ids = sampling.image_ids(1, S, S, ctx.device)
        out, p_step = peak_of(lambda: pipe.denoise(img, ids, txt, txt_ids, vec, pipe.schedule(1, S, S), 3.5))
        _, p_dec = peak_of(lambda: pipe.decode_pixels(out, S, S))
    return [resident, p_text, p_step, p_dec]


def memory_item(ctx, t: Table) -> None:
    pipe = pipeline(ctx)
    rows = {"default": phases(ctx, pipe)}
    for module in (pipe.transformer, pipe.ae, pipe.text.t5, pipe.text.clip):
        module.to("cpu")  # offload=True keeps every component in host memory
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    rows["offload=True"] = phases(ctx, pipeline(ctx, offload=True))
    for mode, vals in rows.items():
        top = max(v for v in vals if v is not None) if ctx.cuda else None
        t.rows.append([mode, *(fmt(v, ".2f") for v in vals), fmt(top, ".2f")])
        if ctx.cuda:
            t.readme.append(f"peak GPU memory, FLUX.1-dev at {ctx.size}² (one step, batch 1), {mode}: {top:.1f} GiB")
    if not ctx.cuda:
        t.notes.append("no CUDA device: peaks not measurable, the code path ran")
    t.notes.append("GiB allocated by PyTorch (torch.cuda.max_memory_allocated), reset before each phase; the "
                   "transformer ends in host memory after this item")
