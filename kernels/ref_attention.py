"""Fused forward attention over reference keys + joint keys, λ-scaled and masked (Triton).

For every query row:  out = Σ_j softmax_j(s_j · q·k_j / √D) · v_j  over the keys [R | T | N]:
R = ref_k/ref_v (B, H, R, D), T = the first n_txt keys of k, N = the rest of k; s_j = λ_r on R, λ_p on T,
1 on N (λ per batch item). ref_mask (B, R) picks the subject's reference tokens:
  "exclude": masked-out reference keys get no weight (FreeCus: it gathers the subject tokens);
  "zero":    K_r ⊙ m, V_r ⊙ m — a masked-out key has logit 0 and a zero value.
The readable definition is `minidit.attention.attention_reference`; this is the fast path for it.

How the kernel works:
- one program per (BLOCK_M queries, batch·head); FlashAttention-2 online softmax in fp32 with exp2: log2(e)/√D
  is folded into one scale per segment (λ_r·c for R, λ_p·c for T, c for N).
- two loops over key blocks, reference first, then the joint keys; the reference is never concatenated to the
  keys. λ_p or 1 is picked per column, so n_txt need not fall on a block boundary.
- block skipping, decided on the host: the mask becomes, per batch item, the list of reference key blocks that
  hold at least one subject token (FlexAttention's kv_indices idea; a few tiny torch ops, cached per mask tensor).
  The kernel loops over those blocks only; the others are never loaded nor multiplied. Why not test the mask
  inside the kernel before loading K: a data-dependent `if` around the loads stops triton's software pipeliner
  (checked in the sm_90 compile: plain synchronous loads and wgmma in that loop), while the index list keeps the
  loop branch-free, its K/V loads streamed through cp.async like the joint loop's. In "zero" mode the keys of
  a skipped block still count (logit 0, value 0): their number n_zero enters as the initial softmax state
  (m = 0, l = n_zero), no loads needed.
- inside a visited block, masked-out tokens are loaded as zeros (predicated loads): that is exactly K⊙m, V⊙m
  for "zero" mode; "exclude" also sets their logits to -inf. Garbage (even NaN) in masked-out reference tokens
  therefore never reaches the output.
- no row is ever fully masked: the joint keys must not be empty (a ValueError, as in the other backends), and
  they always count, so an item whose reference mask is all False is plain attention over the joint keys.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
MASK_MODES = ("exclude", "zero")
HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two; 64 and 128 are what FLUX-like models use


@triton.jit
def _online_softmax_step(qk, v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold one key block in: qk (M, N) logits in log2 units (-inf = no weight), v (N, D)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)  # rescale of what was accumulated so far
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def _ref_attention_fwd(
    Q, K, V, RK, RV, OUT,
    MASK, BLOCKS, COUNTS, NZERO, VISITS,
    lam_r, lam_p, lam_r_stride, lam_p_stride,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_rkb, s_rkh, s_rkn, s_rvb, s_rvh, s_rvn, s_ob, s_oh, s_om, s_mb,
    H, Lq, Lk, R, n_txt, n_rblk, n_mblk, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, ZERO_MODE: tl.constexpr, EVEN_K: tl.constexpr,
    LAM_R_PTR: tl.constexpr, LAM_P_PTR: tl.constexpr, COUNT_VISITS: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :],
                mask=offs_m[:, None] < Lq, other=0.0)  # (M, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # ---- reference keys: only the blocks that hold a subject token -------------------------------------
    if HAS_REF:
        if LAM_R_PTR:
            scale_r = tl.load(lam_r + b * lam_r_stride) * qk_scale
        else:
            scale_r = lam_r * qk_scale
        if HAS_MASK:
            n_blocks = tl.load(COUNTS + b)
            if ZERO_MODE:  # keys of skipped blocks: logit 0, value 0 -> start from (m, l) = (0, n_zero)
                n_zero = tl.load(NZERO + b)
                m_i = tl.zeros([BLOCK_M], tl.float32) + tl.where(n_zero > 0, 0.0, float("-inf"))
                l_i = tl.zeros([BLOCK_M], tl.float32) + n_zero.to(tl.float32)
        else:
            n_blocks = tl.cdiv(R, BLOCK_N)
        rk_base = RK + b * s_rkb + h * s_rkh
        rv_base = RV + b * s_rvb + h * s_rvh
        for i in range(0, n_blocks):
            if HAS_MASK:
                blk = tl.load(BLOCKS + b * n_rblk + i)
            else:
                blk = i
            cols = blk * BLOCK_N + offs_n
            inside = cols < R
            if HAS_MASK:
                keep = inside & (tl.load(MASK + b * s_mb + cols, mask=inside, other=0) != 0)
            else:
                keep = inside
            k = tl.load(rk_base + cols[:, None] * s_rkn + offs_d[None, :], mask=keep[:, None], other=0.0)
            v = tl.load(rv_base + cols[:, None] * s_rvn + offs_d[None, :], mask=keep[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_r
            if ZERO_MODE:  # masked-out tokens were loaded as zeros: logit 0, value 0 (K⊙m, V⊙m)
                qk = tl.where(inside[None, :], qk, float("-inf"))
            else:
                qk = tl.where(keep[None, :], qk, float("-inf"))
            m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PREC)
            if COUNT_VISITS:  # test hook: record which reference blocks this program really visited
                tl.store(VISITS + (pid_bh * n_mblk + pid_m) * n_rblk + blk, 1)

    # ---- joint keys: text (λ_p) then target image (1); the boundary may fall inside a block -------------
    if LAM_P_PTR:
        scale_p = tl.load(lam_p + b * lam_p_stride) * qk_scale
    else:
        scale_p = lam_p * qk_scale
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for start in range(0, Lk, BLOCK_N):
        cols = start + offs_n
        if EVEN_K:  # Lk is a multiple of BLOCK_N: no bounds checks at all
            k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :])
        else:
            inside = cols < Lk
            k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * s_vn + offs_d[None, :], mask=inside[:, None], other=0.0)
        col_scale = tl.where(cols < n_txt, scale_p, qk_scale)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * col_scale[None, :]
        if not EVEN_K:
            qk = tl.where(inside[None, :], qk, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(qk, v, m_i, l_i, acc, PREC)

    out = acc / l_i[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=offs_m[:, None] < Lq)


# ---------------------------------------------------------------------------------------------------------
# host side

def interpreting() -> bool:
    """True when this module's kernel runs through triton's CPU interpreter (TRITON_INTERPRET=1 was set when the
    module was imported: `triton.jit` reads it at decoration time)."""
    return not isinstance(_ref_attention_fwd, triton.runtime.JITFunction)


# Launch configs (block_m, block_n, num_warps, num_stages), most preferred first; the first whose shared memory
# fits the device is used. 16-bit, D <= 128: the H100/H200 default was chosen offline from triton's sm_90 compile
# (K/V loads software-pipelined, no register spills: D=128 211 registers/thread, 128 KiB shared memory;
# BLOCK_N=128 spills); smaller budgets lose a pipeline stage, then half the key block (sm_86/89, 99 KiB:
# 128/32/8/3, 64 KiB, no spills). fp32 runs the exact FMA path (input_precision "ieee"): larger tiles than 32x16
# make ptxas spill kilobytes per thread and take ~15 s to compile. `python bench/attention.py --sweep` times
# the alternatives on a real GPU.
CONFIGS = {
    "16-bit": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
    "16-bit D=256": [(64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)],
    "fp32": [(32, 16, 4, 3), (32, 16, 4, 2)],
}


def smem_estimate(D: int, elsize: int, block_m: int, block_n: int, num_stages: int) -> int:
    """Upper bound on the kernel's shared memory in bytes: num_stages buffers of one K and one V tile
    (block_n, D) for the pipelined loads, the Q tile (block_m, D) (wgmma reads it from shared memory on sm_90)
    and a (block_m, block_n) tile for layout conversions of P. Never below triton's compiled `metadata.shared` in
    ~130 configs compiled offline for sm_80/86/90 (fp32, bf16; D 64/128/256): e.g. bf16 D=128 128/64/3 stages
    147,456 vs 131,072 compiled on sm_90 and 98,304 on sm_80 (Q stays in registers there); the chosen configs are
    checked by tests/test_attention.py."""
    return elsize * (num_stages * 2 * block_n * D + block_m * D + block_m * block_n)


def launch_config(D: int, elsize: int, smem: int) -> dict:
    """The first config of CONFIGS for this element size and head dim whose smem_estimate fits `smem` bytes
    (the device's opt-in shared memory per block); the smallest one if none does."""
    table = CONFIGS["fp32" if elsize == 4 else "16-bit" if D <= 128 else "16-bit D=256"]
    for bm, bn, w, st in table:
        if smem_estimate(D, elsize, bm, bn, st) <= smem:
            break
    return dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)


@functools.cache
def _smem_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def default_config(D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch config: BLOCK_M, BLOCK_N, num_warps, num_stages for this head dim, dtype and device: on CUDA the
    first of CONFIGS that fits the device's shared memory (H100/H200 227 KiB, A100 163 KiB, sm_86/89 99 KiB).
    The CPU interpreter gets small blocks."""
    if device.type != "cuda":
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=1)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return launch_config(D, dtype.itemsize, _smem_optin(index))


_TABLES: OrderedDict = OrderedDict()  # cache key -> (root tensor, its _version, tables); holds the root alive


def block_table(mask: Tensor, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """mask (B, R) bool -> which reference key blocks of block_n tokens the kernel visits:
    blocks (B, n_blk) int32, per batch item the indices of the blocks holding a subject token first, in order;
    counts (B,) int32, how many of those; n_zero (B,) int32, the number of keys in the skipped blocks."""
    B, R = mask.shape
    n_blk = triton.cdiv(R, block_n)
    padded = mask.new_zeros(B, n_blk * block_n)
    padded[:, :R] = mask
    valid = padded.view(B, n_blk, block_n).any(-1)  # (B, n_blk)
    counts = valid.sum(1, dtype=torch.int32)
    blocks = torch.argsort(valid.to(torch.int8), dim=1, descending=True, stable=True).to(torch.int32)
    sizes = (R - torch.arange(n_blk, device=mask.device) * block_n).clamp(max=block_n)  # keys per block
    n_zero = (sizes * ~valid).sum(1).to(torch.int32)
    return blocks.contiguous(), counts, n_zero


def _cached_block_table(key: Tensor, mask: Tensor, block_n: int):
    """block_table(mask), reused while a view of the same memory as `key` (the caller's mask, not modified in place)
    comes back with the same expanded shape: the model passes one mask to every layer and step, so the tiny
    host-side ops run once per mask. The entry is keyed on everything the tables depend on: the memory `key` reads
    (its base tensor, kept alive by the cache so its id cannot be reused, plus offset/shape/strides/dtype), the
    expanded (B, R) shape, the device and block_n. A (R,) mask reused at another batch size gets its own tables."""
    if key.is_inference():  # inference tensors keep no version counter: an in-place change could not be seen
        return block_table(mask, block_n)
    root = key if key._base is None else key._base  # views share their base's version counter
    ident = (id(root), key.storage_offset(), tuple(key.shape), key.stride(), key.dtype,
             tuple(mask.shape), mask.device, block_n)
    hit = _TABLES.get(ident)
    if hit is not None and hit[0] is root and hit[1] == key._version:
        _TABLES.move_to_end(ident)
        return hit[2]
    tables = block_table(mask, block_n)
    _TABLES[ident] = (root, key._version, tables)
    while len(_TABLES) > 8:
        _TABLES.popitem(last=False)
    return tables


def _lambda_arg(lam, B: int, device, name: str):
    """float -> (float, stride 0, False); tensor of 1 or B numbers -> (fp32 tensor, stride, True)."""
    if isinstance(lam, Tensor):
        t = lam.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        if t.numel() not in (1, B):
            raise ValueError(f"{name} must be a float or hold 1 or B={B} values, got shape {tuple(lam.shape)}")
        return t, (1 if t.numel() == B and B > 1 else 0), True
    if isinstance(lam, (int, float)):
        return float(lam), 0, False
    raise TypeError(f"{name} must be a float or a tensor, got {type(lam).__name__}")


def _check(name: str, t: Tensor, shape: tuple, dtype, device) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if tuple(t.shape[:2]) != shape[:2] or t.shape[3] != shape[3]:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected (B, H, *, D) = "
                         f"({shape[0]}, {shape[1]}, *, {shape[3]}) like q")
    if t.dtype != dtype:
        raise ValueError(f"{name} is {t.dtype} but q is {dtype}: all of q, k, v, ref_k, ref_v need one dtype")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t if t.stride(-1) == 1 else t.contiguous()  # any layout with a contiguous head dim is used in place


def ref_attention(
    q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor | None = None, ref_v: Tensor | None = None,
    ref_mask: Tensor | None = None, lambda_ref: float | Tensor = 1.0, lambda_txt: float | Tensor = 1.0,
    n_txt: int = 0, mask_mode: str = "exclude", *,
    block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, visits: Tensor | None = None,
) -> Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), ref_k/ref_v (B, H, R, D) or None (may be expanded over B),
    ref_mask (B, R) bool or None (None = every reference token counts; (R,) or (1, R) = the same for all items);
    λ: float or (B,) tensor; text keys are k[:, :, :n_txt]. fp16/bf16/fp32, head dim a power of two 16..256.
    Returns (B, H, Lq, D) in q's dtype (a view of a (B, Lq, H, D) buffer, so merging heads afterwards is free).
    block_m/block_n/num_warps/num_stages override the launch config; `visits` (int32, zeros,
    (B, H, cdiv(Lq, block_m), cdiv(R, block_n))) is a test hook: visited reference blocks get a 1."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    if not isinstance(q, Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (B, H, Lq, D), got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"ref_attention supports float16, bfloat16 and float32 inputs, got {q.dtype}")
    B, H, Lq, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"ref_attention supports head dims {HEAD_DIMS}, got D={D}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"ref_attention needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
                           "before minidit.kernels is first imported, or use the 'sdpa'/'reference' backends")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = _check("k", k, q.shape, q.dtype, q.device)
    v = _check("v", v, q.shape, q.dtype, q.device)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    Lk = k.shape[2]
    if Lk == 0:
        raise ValueError("k/v hold no tokens: the joint keys must not be empty")
    if isinstance(n_txt, bool) or not isinstance(n_txt, int) or not 0 <= n_txt <= Lk:
        raise ValueError(f"n_txt must be an int in [0, Lk={Lk}], got {n_txt!r}")
    if (ref_k is None) != (ref_v is None):
        raise ValueError("pass both ref_k and ref_v, or neither")
    R = 0
    if ref_k is not None:
        ref_k = _check("ref_k", ref_k, q.shape, q.dtype, q.device)
        ref_v = _check("ref_v", ref_v, q.shape, q.dtype, q.device)
        if ref_k.shape != ref_v.shape:
            raise ValueError(f"ref_k {tuple(ref_k.shape)} and ref_v {tuple(ref_v.shape)} must have the same shape")
        R = ref_k.shape[2]

    cfg = default_config(D, q.dtype, q.device)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    for name, val in (("block_m", block_m), ("block_n", block_n)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]

    if q.dtype == torch.bfloat16 and interpreting():
        # triton 3.9's interpreter gets tl.dot on bf16 wrong (garbage); run the CPU check path in fp32 instead
        up = lambda t: None if t is None else t.float()  # noqa: E731
        out = ref_attention(up(q), up(k), up(v), up(ref_k), up(ref_v), ref_mask, lambda_ref, lambda_txt, n_txt,
                            mask_mode, block_m=block_m, block_n=block_n, visits=visits)
        return out.to(torch.bfloat16)
    out = torch.empty(B, Lq, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)  # (B, H, Lq, D) view
    if Lq == 0:
        return out
    n_mblk = triton.cdiv(Lq, block_m)
    n_rblk = triton.cdiv(R, block_n)

    has_mask = False
    mask = blocks = counts = n_zero = q  # placeholders, never read when the flags are off
    if R and ref_mask is not None:
        if not isinstance(ref_mask, Tensor):
            raise TypeError(f"ref_mask must be a tensor (B, R), got {type(ref_mask).__name__}")
        if ref_mask.shape not in ((B, R), (R,), (1, R)):
            raise ValueError(f"ref_mask has shape {tuple(ref_mask.shape)}; expected (B, R) = ({B}, {R}), (1, {R}) "
                             f"or ({R},)")
        if ref_mask.device != q.device:
            raise ValueError(f"ref_mask is on {ref_mask.device} but q is on {q.device}")
        m = ref_mask if ref_mask.dtype == torch.bool else ref_mask != 0
        m = m.reshape(-1, R).expand(B, R)
        blocks, counts, n_zero = _cached_block_table(ref_mask, m, block_n)
        mask = (m if m.stride(-1) == 1 else m.contiguous()).view(torch.int8)  # an expanded (B, R) mask stays as is
        has_mask = True
    elif R == 0 and ref_mask is not None and ref_mask.numel() != 0:
        raise ValueError(f"ref_mask given ({tuple(ref_mask.shape)}) but there are no reference tokens")

    if visits is not None:
        want = (B, H, n_mblk, n_rblk)
        if visits.shape != want or visits.dtype != torch.int32 or visits.device != q.device:
            raise ValueError(f"visits must be an int32 tensor of shape {want} on {q.device}")
    lam_r, lam_r_stride, lam_r_ptr = _lambda_arg(lambda_ref, B, q.device, "lambda_ref")
    lam_p, lam_p_stride, lam_p_ptr = _lambda_arg(lambda_txt, B, q.device, "lambda_txt")
    rk = ref_k if R else k  # placeholders when there is no reference
    rv = ref_v if R else v

    grid = (n_mblk, B * H)
    _ref_attention_fwd[grid](
        q, k, v, rk, rv, out,
        mask, blocks, counts, n_zero, visits if visits is not None else q,
        lam_r, lam_p, lam_r_stride, lam_p_stride,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), rk.stride(0), rk.stride(1), rk.stride(2),
        rv.stride(0), rv.stride(1), rv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        mask.stride(0) if has_mask else 0,
        H, Lq, Lk, R, n_txt, n_rblk, n_mblk, LOG2E / math.sqrt(D),
        D=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_REF=R > 0, HAS_MASK=has_mask, ZERO_MODE=mask_mode == "zero", EVEN_K=Lk % block_n == 0,
        LAM_R_PTR=lam_r_ptr, LAM_P_PTR=lam_p_ptr, COUNT_VISITS=visits is not None,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
