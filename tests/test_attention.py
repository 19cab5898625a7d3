"""The fused reference-attention kernel (through triton's CPU interpreter) against the readable reference and SDPA.

conftest sets TRITON_INTERPRET=1 before anything imports minidit.kernels. The interpreter's bf16 tl.dot is wrong
(triton 3.9), so bf16 runs on a GPU only (`gpu` mark, compiled kernel in a subprocess). Every tolerance below is
shown to be far below the change a wrong λ segment, a wrong mask or a missing softmax rescale would make.
"""
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from minidit import attention as A
from minidit.attention import attention, attention_reference, attention_sdpa, key_scales, set_backend
from minidit.kernels.ref_attention import ref_attention
from minidit.rope import embed_nd

K = importlib.import_module("minidit.kernels.ref_attention")
TOL = {torch.float16: 3e-3, torch.float32: 2e-5}
BLK = dict(block_m=16, block_n=16)  # small blocks: several blocks and ragged tails even at tiny sizes
B, H, LQ, LK, R, N_TXT = 2, 2, 40, 37, 45, 7  # nothing is a multiple of 16; the text boundary falls inside a block
LR, LP = torch.tensor([1.4, 0.7]), torch.tensor([0.6, 1.5])  # per batch item


def test_runs_in_the_interpreter():
    assert K.interpreting(), "TRITON_INTERPRET=1 must be set before minidit.kernels is imported (conftest does it)"


def inputs(D, dtype, Lq=LQ, Lk=LK, R_=R, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(L, scale=1.0):
        return (torch.randn(b, H, L, D, generator=g) * scale).to(dtype)
    return rnd(Lq, 1.5), rnd(Lk), rnd(Lk), rnd(R_), rnd(R_)  # sharper attention: q scaled by 1.5


def subject_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, R, generator=g) < torch.tensor([[0.4], [0.6]])
    m[0, :16] = False  # item 0: reference block 0 entirely masked out
    m[1, 32:] = False  # item 1: the last (ragged) block entirely masked out
    return m


def ref(q, k, v, rk, rv, m, lr, lp, n_txt, mode):
    f = [t if t is None else t.float() for t in (q, k, v, rk, rv)]
    return attention_reference(*f, m, lr, lp, n_txt, mode).float()


def no_rescale(q, k, v, rk, rv, m, lr, lp, n_txt, mode, block=16):
    """A deliberately broken online softmax: each key block normalised by its own max, never rescaled."""
    q, k, v, rk, rv = (t.float() for t in (q, k, v, rk, rv))
    Rr, Lk = rk.shape[2], k.shape[2]
    keys, vals = torch.cat([rk, k], 2), torch.cat([rv, v], 2)
    s = key_scales(q.shape[0], Rr, Lk, n_txt, lr, lp, q.device)
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]) * s[:, None, None, :]
    keep = torch.cat([m, m.new_ones(m.shape[0], Lk)], 1)[:, None, None, :]
    if mode == "exclude":
        logits = logits.masked_fill(~keep, -math.inf)
    else:
        logits = logits.masked_fill(~keep, 0.0)
        vals = vals * keep.transpose(-1, -2)
    num = den = 0
    for st in range(0, Rr + Lk, block):
        lg = logits[..., st:st + block]
        p = torch.exp(lg - lg.amax(-1, keepdim=True).clamp(min=-1e30))
        num, den = num + p @ vals[:, :, st:st + block], den + p.sum(-1, keepdim=True)
    return num / den


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- parity, and proof that the tolerance catches the bugs that matter ---------------------------------------

@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("mode", ["exclude", "zero"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_matches_reference_and_sdpa(D, mode, dtype):
    q, k, v, rk, rv = inputs(D, dtype)
    m = subject_mask()
    out = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, mode, **BLK)
    assert out.shape == (B, H, LQ, D) and out.dtype == dtype
    want = ref(q, k, v, rk, rv, m, LR, LP, N_TXT, mode)
    tol = TOL[dtype]
    assert maxdiff(out, want) <= tol
    sd = attention_sdpa(*(t.float() for t in (q, k, v, rk, rv)), m, LR, LP, N_TXT, mode)
    assert maxdiff(sd, want) <= 2e-5  # the sdpa backend computes the same thing

    f = (q, k, v, rk, rv)
    other = "zero" if mode == "exclude" else "exclude"
    wrong = {
        "λ_r and λ_p swapped": ref(*f, m, LP, LR, N_TXT, mode),
        "λ of the other batch item": ref(*f, m, LR.flip(0), LP.flip(0), N_TXT, mode),
        "λ_p not applied": ref(*f, m, LR, 1.0, N_TXT, mode),
        "λ_r not applied": ref(*f, m, 1.0, LP, N_TXT, mode),
        "text boundary one late": ref(*f, m, LR, LP, N_TXT + 1, mode),
        "text boundary one early": ref(*f, m, LR, LP, N_TXT - 1, mode),
        "mask inverted": ref(*f, ~m, LR, LP, N_TXT, mode),
        "mask of the other batch item": ref(*f, m.flip(0), LR, LP, N_TXT, mode),
        "the other mask mode": ref(*f, m, LR, LP, N_TXT, other),
        "no online-softmax rescale": no_rescale(*f, m, LR, LP, N_TXT, mode),
    }
    for what, w in wrong.items():
        assert maxdiff(out, w) > 30 * tol, f"tolerance {tol} would not catch: {what}"


def test_lambda_one_is_plain_attention():
    q, k, v, rk, rv = inputs(64, torch.float32)
    plain = F.scaled_dot_product_attention(q, k, v)
    for lam in (1.0, torch.ones(B)):
        assert maxdiff(ref_attention(q, k, v, None, None, None, lam, lam, N_TXT, **BLK), plain) <= 2e-6
    # with a reference and a full mask, λ = 1 is plain attention over the concatenated keys
    cat = F.scaled_dot_product_attention(q, torch.cat([rk, k], 2), torch.cat([rv, v], 2))
    full = torch.ones(B, R, dtype=torch.bool)
    for mode in ("exclude", "zero"):
        assert maxdiff(ref_attention(q, k, v, rk, rv, full, 1.0, 1.0, N_TXT, mode, **BLK), cat) <= 2e-6
    assert maxdiff(ref_attention(q, k, v, rk, rv, None, 1.0, 1.0, N_TXT, **BLK), cat) <= 2e-6


def test_no_reference_tokens():
    q, k, v, rk, rv = inputs(64, torch.float16)
    want = ref(q, k, v, None, None, None, LR, LP, N_TXT, "exclude")
    empty = rk[:, :, :0]
    for out in (ref_attention(q, k, v, None, None, None, LR, LP, N_TXT, **BLK),
                ref_attention(q, k, v, empty, empty, torch.zeros(B, 0, dtype=torch.bool), LR, LP, N_TXT, **BLK)):
        assert maxdiff(out, want) <= TOL[torch.float16]
    assert maxdiff(want, ref(q, k, v, None, None, None, LR, 1.0, N_TXT, "exclude")) > 30 * TOL[torch.float16]


@pytest.mark.parametrize("mode", ["exclude", "zero"])
def test_all_masked_reference(mode):
    q, k, v, rk, rv = inputs(64, torch.float32)
    none = torch.zeros(B, R, dtype=torch.bool)
    visits = torch.zeros(B, H, 3, 3, dtype=torch.int32)
    out = ref_attention(q, k, v, rk, rv, none, LR, LP, N_TXT, mode, visits=visits, **BLK)
    assert int(visits.sum()) == 0  # no reference block was even loaded
    assert maxdiff(out, ref(q, k, v, rk, rv, none, LR, LP, N_TXT, mode)) <= 2e-5
    without = ref(q, k, v, None, None, None, LR, LP, N_TXT, mode)  # "exclude": as if there were no reference
    assert (maxdiff(out, without) <= 2e-5) == (mode == "exclude")


@pytest.mark.parametrize("Lq,Lk,Rr,n_txt", [(1, 1, 1, 0), (17, 33, 16, 33), (5, 16, 31, 16), (33, 20, 64, 3)])
@pytest.mark.parametrize("mode", ["exclude", "zero"])
def test_ragged_lengths(Lq, Lk, Rr, n_txt, mode):
    q, k, v, rk, rv = inputs(64, torch.float32, Lq=Lq, Lk=Lk, R_=Rr, seed=Lq)
    m = torch.rand(B, Rr, generator=torch.Generator().manual_seed(1)) < 0.5
    m[:, 0] = True
    out = ref_attention(q, k, v, rk, rv, m, LR, LP, n_txt, mode, **BLK)
    assert maxdiff(out, ref(q, k, v, rk, rv, m, LR, LP, n_txt, mode)) <= 2e-5


def test_batch_items_are_independent():
    q, k, v, rk, rv = inputs(64, torch.float32)
    m = subject_mask()
    out = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)
    for b in range(B):
        one = ref_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], rk[b:b + 1], rv[b:b + 1], m[b:b + 1],
                            float(LR[b]), float(LP[b]), N_TXT, "exclude", **BLK)
        assert maxdiff(out[b:b + 1], one) <= 1e-6


# ---- block skipping ------------------------------------------------------------------------------------------

def test_block_table():
    m = torch.zeros(2, 45, dtype=torch.bool)
    m[0, [3, 40]] = True  # blocks 0 and 2
    m[1, 20] = True  # block 1
    blocks, counts, n_zero = K.block_table(m, 16)
    assert counts.tolist() == [2, 1]
    assert blocks[0, :2].tolist() == [0, 2] and blocks[1, :1].tolist() == [1]
    assert n_zero.tolist() == [16, 16 + 13]  # keys in skipped blocks (the last block holds 13)


@pytest.mark.parametrize("mode", ["exclude", "zero"])
def test_masked_blocks_are_skipped(mode):
    q, k, v, rk, rv = inputs(64, torch.float32)
    m = subject_mask()
    visits = torch.zeros(B, H, 3, 3, dtype=torch.int32)
    clean = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, mode, visits=visits, **BLK)
    padded = torch.zeros(B, 48, dtype=torch.bool)
    padded[:, :R] = m
    expect = padded.view(B, 3, 16).any(-1).int()  # (B, blocks): visited iff the block holds a subject token
    assert expect[0, 0] == 0 and expect[1, 2] == 0
    assert torch.equal(visits, expect[:, None, None, :].expand(B, H, 3, 3))
    # NaN in every masked-out reference token (whole skipped blocks and holes in visited ones) never reaches the output
    rk_nan, rv_nan = rk.clone(), rv.clone()
    rk_nan[~m[:, None, :, None].expand_as(rk)] = float("nan")
    rv_nan[~m[:, None, :, None].expand_as(rv)] = float("nan")
    out = ref_attention(q, k, v, rk_nan, rv_nan, m, LR, LP, N_TXT, mode, **BLK)
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


def test_mask_changed_in_place_is_seen():
    q, k, v, rk, rv = inputs(64, torch.float32)
    m = subject_mask()
    ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)  # fills the block-table cache
    m[1, :] = False
    m[1, 40] = True
    out = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)
    assert maxdiff(out, ref(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude")) <= 2e-5


def test_block_table_cache_is_keyed_on_the_expanded_shape():
    """One (R,) mask reused at B=1 then B=3: the B=1 tables must not be reused (the kernel would read counts and
    block lists of items 1 and 2 past their end)."""
    m = subject_mask()[1]  # (R,)
    one = K._cached_block_table(m, m.reshape(1, R).expand(1, R), 16)
    three = K._cached_block_table(m, m.reshape(1, R).expand(3, R), 16)
    assert one[0].shape[0] == one[1].shape[0] == 1
    assert [t.shape[0] for t in three] == [3, 3, 3]
    assert three[1].tolist() == [one[1].item()] * 3
    assert K._cached_block_table(m, m.reshape(1, R).expand(1, R), 8)[0].shape == (1, 6)  # block_n is in the key too
    q, k, v, rk, rv = inputs(64, torch.float32, b=3)
    lr, lp = torch.tensor([1.4, 0.7, 1.1]), torch.tensor([0.6, 1.5, 1.0])
    for mask in (m, m[None]):  # (R,) and (1, R), each at B=1 first, then B=3
        for b in (1, 3):
            f = [t[:b] for t in (q, k, v, rk, rv)]
            out = ref_attention(*f, mask, lr[:b], lp[:b], N_TXT, "zero", **BLK)
            want = ref(*f, mask.reshape(1, R).expand(b, R), lr[:b], lp[:b], N_TXT, "zero")
            assert maxdiff(out, want) <= 2e-5


def test_block_table_cache_hits_for_views_of_one_mask(monkeypatch):
    """attention() expands a (R,) mask to (B, R) with a new view each call; the tables are still built once."""
    calls = []
    real = K.block_table
    monkeypatch.setattr(K, "block_table", lambda *a: calls.append(1) or real(*a))
    q, k, v, rk, rv = inputs(64, torch.float32)
    m = subject_mask()[0].clone()  # a fresh tensor: not in the cache yet
    kw = dict(ref_k=rk, ref_v=rv, ref_mask=m, lambda_ref=LR, lambda_txt=LP, n_txt=N_TXT, backend="triton")
    first = attention(q, k, v, **kw)
    assert torch.equal(attention(q, k, v, **kw), first) and len(calls) == 1
    m[:16] = ~m[:16]  # changed in place: seen through the view's shared version counter
    out = attention(q, k, v, **kw)
    assert len(calls) == 2
    assert maxdiff(out, attention(q, k, v, **{**kw, "backend": "reference"})) <= 2e-5


def test_inference_mode_mask():
    """Inference tensors keep no version counter: the mask is then not cached, and in-place changes are seen."""
    q, k, v, rk, rv = inputs(64, torch.float32)
    with torch.inference_mode():
        m = subject_mask()
        ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)
        m[1] = ~m[1]
        out = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)
    assert maxdiff(out, ref(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude")) <= 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_shapes_on_every_backend(dtype):
    """(B, R), (1, R) and (R,) masks (and non-bool ones) mean the same on every backend; other shapes are refused."""
    q, k, v, rk, rv = inputs(64, dtype)
    full = subject_mask()
    full[1] = full[0]  # one mask for both items, so that (1, R) and (R,) can say the same
    kw = dict(ref_k=rk, ref_v=rv, lambda_ref=LR, lambda_txt=LP, n_txt=N_TXT)
    want = attention(q, k, v, ref_mask=full, backend="reference", mask_mode="zero", **kw).float()
    assert maxdiff(want, attention(q, k, v, ref_mask=~full, backend="reference", mask_mode="zero", **kw)) > 0.1
    for backend in ("reference", "sdpa", "triton"):
        for m in (full, full[:1], full[0], full.to(torch.uint8), full[0].float()):
            out = attention(q, k, v, ref_mask=m, backend=backend, mask_mode="zero", **kw)
            assert out.shape == want.shape and out.dtype == dtype
            assert maxdiff(out, want) <= TOL[dtype], (backend, tuple(m.shape), m.dtype)
        for bad in (full[:, :-1], full[0, :-1], torch.ones(3, R, dtype=torch.bool), full[..., None]):
            with pytest.raises(ValueError, match=r"ref_mask has shape .*expected \(B, R\) = \(2, 45\), "
                                                 r"\(1, 45\) or \(45,\)"):
                attention(q, k, v, ref_mask=bad, backend=backend, **kw)
        with pytest.raises(ValueError, match="no reference keys"):
            attention(q, k, v, ref_mask=full, backend=backend)
        with pytest.raises(TypeError, match="ref_mask must be a tensor"):
            attention(q, k, v, ref_mask=[True] * R, backend=backend, **kw)
    assert A.subject_mask_arg(full, q, rk) is full  # passed through as is: the triton block-table cache key


# ---- layouts, dispatch, errors -------------------------------------------------------------------------------

def test_strided_inputs_and_output_layout():
    q, k, v, rk, rv = inputs(64, torch.float16)
    m = subject_mask()
    want = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "zero", **BLK)
    blhd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, rk, rv)]  # (B, L, H, D) storage
    assert not blhd[0].is_contiguous()
    assert torch.equal(ref_attention(*blhd, m, LR, LP, N_TXT, "zero", **BLK), want)
    odd = [torch.stack([t, t], -1)[..., 0] for t in (q, k, v, rk, rv)]  # head dim not contiguous: copied
    assert odd[0].stride(-1) == 2
    assert torch.equal(ref_attention(*odd, m, LR, LP, N_TXT, "zero", **BLK), want)
    assert want.transpose(1, 2).is_contiguous()  # written as (B, Lq, H, D): merging heads is a free view


def test_expanded_reference_as_refstate_passes_it():
    """RefState.reference_kv gives every target the same reference: K/V and mask expanded (batch stride 0)."""
    q, k, v, rk, rv = inputs(64, torch.float32)
    rk1, rv1 = rk[:1].expand(B, -1, -1, -1), rv[:1].expand(B, -1, -1, -1)
    m1 = subject_mask()[:1].expand(B, -1)
    assert rk1.stride(0) == 0 and m1.stride(0) == 0
    out = ref_attention(q, k, v, rk1, rv1, m1, LR, LP, N_TXT, "exclude", **BLK)
    assert maxdiff(out, ref(q, k, v, rk1, rv1, m1, LR, LP, N_TXT, "exclude")) <= 2e-5


def test_attention_dispatch_with_rope():
    D = 64
    q, k, v, rk, rv = inputs(D, torch.float32, Lk=LQ)  # joint attention: queries and keys are the same tokens
    ids = torch.zeros(B, LQ, 3)
    ids[:, N_TXT:, 1] = torch.arange(LQ - N_TXT) // 6
    ids[:, N_TXT:, 2] = torch.arange(LQ - N_TXT) % 6
    pe = embed_nd(ids, (8, 28, 28), 10000)
    m = subject_mask()
    kw = dict(ref_k=rk, ref_v=rv, ref_mask=m, lambda_ref=LR, lambda_txt=LP, n_txt=N_TXT)
    outs = {be: attention(q, k, v, pe, backend=be, **kw) for be in ("reference", "sdpa", "triton")}
    assert outs["reference"].shape == (B, LQ, H * D)
    assert maxdiff(outs["triton"], outs["reference"]) <= 2e-5
    assert maxdiff(outs["sdpa"], outs["reference"]) <= 2e-5
    assert maxdiff(outs["reference"], attention(q, k, v, None, backend="reference", **kw)) > 1e-2  # pe is used
    assert A.auto_backend(q) == "sdpa"  # CPU; triton is chosen for CUDA fp16/bf16 (checked by the gpu test)


def test_set_backend(monkeypatch):
    q, k, v, _, _ = inputs(64, torch.float32)
    calls = []
    monkeypatch.setattr(A, "_backend", A._backend)  # restored afterwards, whatever the test sets
    monkeypatch.setattr(A, "attention_reference", lambda *a: calls.append(1) or a[0])
    set_backend("reference")
    attention(q, k, v)
    assert calls == [1]
    set_backend(None)
    attention(q, k, v)
    assert calls == [1]  # automatic: sdpa on CPU
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_backend("cuda")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")


def test_bad_inputs_are_named():
    q, k, v, rk, rv = inputs(64, torch.float32)
    m = subject_mask()
    cases = [
        (dict(mask_mode="drop"), "mask_mode"),
        (dict(n_txt=LK + 1), "n_txt"),
        (dict(k=k[..., :32]), "k has shape"),
        (dict(v=v.half()), "v is torch.float16"),
        (dict(ref_v=None), "both ref_k and ref_v"),
        (dict(ref_k=rk[:, :, :5], ref_v=rv), "must have the same shape"),
        (dict(ref_mask=m[:, :5]), "ref_mask has shape"),
        (dict(lambda_ref=torch.ones(3)), "lambda_ref"),
        (dict(lambda_txt="big"), "lambda_txt"),
        (dict(q=q[..., :48], k=k[..., :48], v=v[..., :48], ref_k=rk[..., :48], ref_v=rv[..., :48]), "head dims"),
        (dict(q=q.double()), "float16, bfloat16 and float32"),
        (dict(k=k[:, :, :0], v=v[:, :, :0], n_txt=0), "joint keys must not be empty"),
    ]
    base = dict(q=q, k=k, v=v, ref_k=rk, ref_v=rv, ref_mask=m, lambda_ref=LR, lambda_txt=LP, n_txt=N_TXT)
    for change, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            ref_attention(**{**base, **change})
    with pytest.raises(ValueError, match="mask_mode"):
        attention(q, k, v, mask_mode="drop")


def test_bf16_in_the_interpreter_is_upcast():
    q, k, v, rk, rv = inputs(64, torch.bfloat16)
    m = subject_mask()
    out = ref_attention(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude", **BLK)
    assert out.dtype == torch.bfloat16
    assert maxdiff(out, ref(q, k, v, rk, rv, m, LR, LP, N_TXT, "exclude")) <= 2e-2


# ---- compiled kernel: sm_90 code generation without a GPU; bf16 on a real GPU --------------------------------

COMPILE = r"""
import importlib, json, os, subprocess, sys, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
K = importlib.import_module("minidit.kernels.ref_attention")
fn = K._ref_attention_fwd
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_(dtype, D, cc, cfg, mask=True):
    t = {"bf16": "*bf16", "fp32": "*fp32"}[dtype]
    ptrs = {"Q": t, "K": t, "V": t, "RK": t, "RV": t, "OUT": t, "MASK": "*i8", "BLOCKS": "*i32", "COUNTS": "*i32",
            "NZERO": "*i32", "VISITS": "*i32", "lam_r": "*fp32", "lam_p": "*fp32", "qk_scale": "fp32"}
    const = dict(D=D, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], HAS_REF=True, HAS_MASK=mask,
                 ZERO_MODE=False, EVEN_K=True, LAM_R_PTR=True, LAM_P_PTR=True, COUNT_VISITS=False,
                 PREC="ieee" if dtype == "fp32" else "tf32")
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in fn.arg_names}
    # what the JIT infers for 16-byte aligned pointers and strides divisible by 16 (row strides of (B,H,L,D))
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n].startswith("*") or (n.startswith("s_") and n != "s_mb")}
    k = triton.compile(triton.compiler.ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(ptxas, "cuobjdump"), "--dump-resource-usage", f.name],
                           capture_output=True, text=True).stdout
    os.unlink(f.name)
    return dict(cfg=cfg, async_copies=k.asm["ttgir"].count("async_copy_global_to_local"),
                usage=[l.strip() for l in usage.splitlines() if "REG:" in l][0], shared=k.metadata.shared,
                estimate=K.smem_estimate(D, 4 if dtype == "fp32" else 2, cfg["block_m"], cfg["block_n"],
                                         cfg["num_stages"]))


res = {}
if sys.argv[1] == "sm90":
    res["interpreting"] = K.interpreting()
    try:
        K.ref_attention(*(torch.zeros(1, 1, 4, 64) for _ in range(3)))
    except RuntimeError as e:
        res["cpu_error"] = str(e)
    for mask in (True, False):  # H100/H200: 232,448 bytes of opt-in shared memory per block
        res[f"mask={mask}"] = compile_("bf16", 128, 90, K.launch_config(128, 2, 232448), mask)
else:  # sm_86/89 (101,376 bytes) and A100 (166,912 bytes)
    for dtype in sys.argv[1].split(","):
        for D in (64, 128):
            for cc, smem in ((86, 101376), (80, 166912)):
                cfg = K.launch_config(D, 4 if dtype == "fp32" else 2, smem)
                res[f"{dtype} D={D} sm_{cc}"] = dict(compile_(dtype, D, cc, cfg), budget=smem)
print("RESULT" + json.dumps(res))
"""


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _bundled_ptxas():
    bin_dir = os.path.join(os.path.dirname(importlib.util.find_spec("triton").origin), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("triton wheel without ptxas")


def _compile_offline(*jobs):
    """Runs COMPILE (real, not interpreted kernels for a GPUTarget, no GPU needed) once per job, in parallel."""
    procs = [subprocess.Popen([sys.executable, "-c", COMPILE, job], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_clean_env(), cwd=ROOT) for job in jobs]
    done = [(p, *p.communicate(timeout=300)) for p in procs]
    res = {}
    for p, out, err in done:
        assert p.returncode == 0, err[-3000:]
        res.update(json.loads(out.split("RESULT", 1)[1]))
    return res


def test_compiles_for_sm90_pipelined_without_spills():
    """The real (not interpreted) kernel, compiled for H100/H200 by triton's bundled ptxas, no GPU needed."""
    _bundled_ptxas()
    res = _compile_offline("sm90")
    assert res["interpreting"] is False
    assert "TRITON_INTERPRET=1" in res["cpu_error"]  # CPU tensors without the interpreter: a clear error
    for variant in ("mask=True", "mask=False"):
        r = res[variant]
        assert r["cfg"] == dict(block_m=128, block_n=64, num_warps=8, num_stages=3)  # the H100/H200 default
        assert r["async_copies"] >= 4, r  # K and V of both loops stream through cp.async (software pipelined)
        assert "STACK:0 " in r["usage"], r  # no register spills with the default launch config
        assert r["shared"] <= r["estimate"] <= 232448, r


def test_chosen_configs_fit_smaller_gpus():
    """fp32 and bf16 at D 64/128, compiled for sm_86 (101,376 bytes of shared memory per block) and sm_80
    (166,912): the chosen config's shared memory, read from the compiled kernel, fits, and smem_estimate bounds it.
    (The old fixed 128/64/3-stage config needed 229,888 bytes in fp32 at D=128 and 131,072 at D=64.)"""
    _bundled_ptxas()
    res = _compile_offline("fp32", "bf16")
    assert len(res) == 8
    for what, r in res.items():
        assert r["shared"] <= r["budget"], (what, r)
        assert r["shared"] <= r["estimate"] <= r["budget"], (what, r)  # the estimate is an upper bound
        assert r["async_copies"] >= 4, (what, r)  # still software pipelined
    assert res["bf16 D=128 sm_86"]["cfg"]["block_n"] == 32 and "STACK:0 " in res["bf16 D=128 sm_86"]["usage"]


def test_default_config_follows_the_device(monkeypatch):
    """default_config on CUDA reads the device's opt-in shared memory per block (faked here: no GPU)."""
    budget = {}
    monkeypatch.setattr(K, "_smem_optin", lambda index: budget[index])
    budget.update({0: 232448, 1: 166912, 2: 101376})  # H100/H200, A100, sm_86/89
    h100 = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    for dev in (0, 1, 2):
        for D in (64, 128):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                cfg = K.default_config(D, dtype, torch.device("cuda", dev))
                est = K.smem_estimate(D, dtype.itemsize, cfg["block_m"], cfg["block_n"], cfg["num_stages"])
                assert est <= budget[dev], (dev, D, dtype, cfg)
                if dtype != torch.float32 and (D == 64 or dev < 2):
                    assert cfg == h100  # kept wherever it fits
    assert K.default_config(128, torch.bfloat16, torch.device("cuda", 2))["block_n"] == 32
    assert K.smem_estimate(128, 4, 128, 64, 3) > 166912  # the old fp32 choice did not fit an A100
    assert K.default_config(64, torch.float32, torch.device("cpu"))["num_stages"] == 1  # the interpreter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_fp16_on_gpu():
    """Compiled kernel (TRITON_INTERPRET unset, hence a subprocess) in bf16/fp16 vs the fp32 reference, ≤ 2e-2."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--check"], capture_output=True,
                       text=True, env=_clean_env(), cwd=ROOT, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


# ---- benchmark script --------------------------------------------------------------------------------------------

def test_bench_smoke_runs_end_to_end():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke"])
    assert [r["mask"] for r in rows] == ["100%", "30%", "0%"]
    for r in rows:
        assert r["err"] <= 2e-5 and r["ms"] > 0
        assert r["sdpa+m_err"] <= 2e-5, r  # the baselines compute the same thing
        assert r.get("flex_err", 0.0) <= 2e-5, r


# ---- edge cases: every backend means the same thing ----------------------------------------------------------

BACKEND_FNS = {"reference": attention_reference, "sdpa": attention_sdpa, "triton": ref_attention}


@pytest.mark.parametrize("mode", ["exclude", "zero"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_garbage_in_masked_out_reference_never_leaks(mode, dtype):
    q, k, v, rk, rv = inputs(64, dtype)
    m = subject_mask()
    want = ref(q, k, v, rk, rv, m, LR, LP, N_TXT, mode)
    bad_k, bad_v = rk.clone(), rv.clone()
    for t, val in ((bad_k, float("nan")), (bad_v, float("inf"))):
        t.masked_fill_(~m[:, None, :, None], val)
    bad_v[~m[:, None, :, None].expand_as(bad_v)] = float("nan")
    for name, fn in BACKEND_FNS.items():
        out = fn(q, k, v, bad_k, bad_v, m, LR, LP, N_TXT, mode)
        assert torch.isfinite(out).all(), f"{name}: NaN/Inf of masked-out tokens leaked"
        assert maxdiff(out, want) <= TOL[dtype], name


@pytest.mark.parametrize("backend", list(BACKEND_FNS))
def test_item_with_every_reference_key_masked_is_attention_without_it(backend):
    """No row is ever fully masked (the joint keys always count): an all-False mask in "exclude" mode is exactly
    attention over the joint keys alone, in every backend; empty joint keys are a named error."""
    q, k, v, rk, rv = inputs(64, torch.float32)
    none = torch.zeros(B, R, dtype=torch.bool)
    out = BACKEND_FNS[backend](q, k, v, rk, rv, none, LR, LP, N_TXT, "exclude")
    assert maxdiff(out, ref(q, k, v, None, None, None, LR, LP, N_TXT, "exclude")) <= 2e-5
    with pytest.raises(ValueError, match="joint keys must not be empty"):
        BACKEND_FNS[backend](q, k[:, :, :0], v[:, :, :0], rk, rv, none, LR, LP, 0, "exclude")


@pytest.mark.parametrize("backend", list(BACKEND_FNS))
def test_fp16_with_large_lambda_does_not_overflow(backend):
    q, k, v, rk, rv = inputs(64, torch.float16)
    k, rk = k * 60, rk * 60  # |k| up to ~250: λ = 300 folded into fp16 keys would overflow (> 65504)
    lr, lp = 300.0, torch.tensor([200.0, 250.0])
    want = ref(q, k, v, rk, rv, None, lr, lp, N_TXT, "exclude")
    out = BACKEND_FNS[backend](q, k, v, rk, rv, None, lr, lp, N_TXT, "exclude")
    assert torch.isfinite(out).all() and maxdiff(out, want) <= TOL[torch.float16]


@pytest.mark.parametrize("backend", list(BACKEND_FNS))
def test_bad_arguments_are_named_in_every_backend(backend):
    q, k, v, rk, rv = inputs(64, torch.float32)
    fn = BACKEND_FNS[backend]
    for n_txt in (LK + 1, -1, 2.5):
        with pytest.raises(ValueError, match="n_txt"):
            fn(q, k, v, rk, rv, None, LR, LP, n_txt, "exclude")
    for a, b in ((rk, None), (None, rv)):
        with pytest.raises(ValueError, match="both ref_k and ref_v"):
            fn(q, k, v, a, b, None, LR, LP, N_TXT, "exclude")
    with pytest.raises(ValueError, match="n_txt"):
        attention(q, k, v, n_txt=LK + 1, lambda_txt=2.0, backend=backend)
