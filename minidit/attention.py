"""The one attention entry of the model: joint attention, optionally over extra reference keys.

    out = attention(q, k, v, pe)                                    # plain FLUX joint attention
    out = attention(q, k, v, pe, ref_k=..., ref_v=..., ref_mask=...,
                    lambda_ref=..., lambda_txt=..., n_txt=512)      # masked, λ-scaled reference attention

Keys are made of up to three segments: reference image tokens R (`ref_k`, already rotated by the caller at
whatever positions the method wants), the text tokens T (the first `n_txt` of `k`) and the target's image
tokens N (the rest of `k`). The logit of key j is `s_j · (q·k_j) / √D` with s_j = λ_r on R, λ_p on T and 1 on N
(the papers' K' = [λ_r·K_r, λ_p·K_p, K]). `ref_mask` (B, R) bool selects the subject's reference tokens:
  mask_mode="exclude": masked-out reference keys get no weight at all. The default, because it is what FreeCus'
      code does (Monalissaa/FreeCus, sa_handler_for_flux_clean.py): its "save" pass stores
      `scale * key[:, :, 512:, :][:, :, indices, :]` and `value[:, :, 512:, :][:, :, indices, :]`, the RoPE'd image
      keys/values gathered at the subject indices (mask > 0), so the other tokens do not exist for the softmax;
      its "use" pass multiplies the 512 text keys by `scale` and concatenates [stored K_r, K]. Its defaults:
      λ_r = 1.1 (Handler.register's `scale`, used by the save pass), λ_p = `--extend_scale` = 1.1 (infer.py).
  mask_mode="zero": the literal formula K_r ⊙ m, V_r ⊙ m — a masked-out key keeps logit 0 and adds a zero value.

Edge cases, the same in every backend: NaN/Inf stored in masked-out reference keys/values never reaches the output
(they are zeroed before use, as the kernel's predicated loads do); the joint keys k/v must not be empty, so every
query row keeps at least its joint keys and no row is ever fully masked (a reference whose mask is all False is
exactly attention without it in "exclude" mode); `n_txt` outside [0, Lk] and ref_k without ref_v (or the reverse)
are ValueErrors; λ is folded so that it cannot overflow fp16 (SDPA gets max|s|/√D as its scale, the keys s/max|s|).

Backends: "reference" (plain PyTorch, fp32 math, readable: the definition), "sdpa" (PyTorch SDPA, λ folded
into K), "triton" (the fused kernel `minidit.kernels.ref_attention`: CUDA, or CPU tensors when TRITON_INTERPRET=1
was set before minidit.kernels is first imported). Default: triton on CUDA for fp16/bf16 and head dim 64/128
when there are reference keys or a λ ≠ 1 (plain joint attention stays on SDPA's flash/cuDNN kernels), else
sdpa; override per call or globally with `set_backend` / env MINIDIT_ATTENTION.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .rope import apply_rope

BACKENDS = ("triton", "sdpa", "reference")
_backend: str | None = os.environ.get("MINIDIT_ATTENTION") or None


def set_backend(name: str | None) -> None:
    """Choose the attention backend for every call that does not pass one (None = automatic)."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def check_backend(name: str | None = None) -> None:
    """The backend `name` (default: the one set by `set_backend` / MINIDIT_ATTENTION) can run here: a known name,
    and triton installed for "triton". Run before any model loads (Pipeline.load, the CLI); one ValueError."""
    env = os.environ.get("MINIDIT_ATTENTION") or None
    name = (_backend if env is None or env in BACKENDS else env) if name is None else name
    what = f"MINIDIT_ATTENTION={name}" if name is not None and name == env else f"attention backend {name!r}"
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{what}: unknown; choose one of {', '.join(BACKENDS)} (or unset it: automatic)")
    if name == "triton" and not _have_triton():
        raise ValueError(f"{what}: triton is not installed (pip install triton on Linux; or use sdpa)")


def backend() -> str:
    """The backend set by `set_backend` / MINIDIT_ATTENTION, or "auto" (chosen per call)."""
    return _backend or "auto"


def attention(
    q: Tensor, k: Tensor, v: Tensor, pe: Tensor | None = None, *,
    ref_k: Tensor | None = None, ref_v: Tensor | None = None, ref_mask: Tensor | None = None,
    lambda_ref: float | Tensor = 1.0, lambda_txt: float | Tensor = 1.0, n_txt: int = 0,
    mask_mode: str = "exclude", backend: str | None = None,
) -> Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), pe (B, 1, L, D/2, 2, 2) applied to q and k (RoPE);
    ref_k/ref_v (B, H, R, D), ref_mask (B, R), (1, R) or (R,) bool (the last two: one mask for every item);
    λ: float or (B,) tensor.  Returns (B, Lq, H·D)."""
    if pe is not None:
        q, k = apply_rope(q, pe), apply_rope(k, pe)
    if mask_mode not in ("exclude", "zero"):
        raise ValueError(f"mask_mode must be 'exclude' or 'zero', got {mask_mode!r}")
    ref_mask = subject_mask_arg(ref_mask, q, ref_k)  # every backend gets (B, R) bool on q's device
    backend = backend or _backend or auto_backend(q, reference=ref_k is not None or not _is_one(lambda_txt))
    if backend == "reference":
        out = attention_reference(q, k, v, ref_k, ref_v, ref_mask, lambda_ref, lambda_txt, n_txt, mask_mode)
    elif backend == "sdpa":
        out = attention_sdpa(q, k, v, ref_k, ref_v, ref_mask, lambda_ref, lambda_txt, n_txt, mask_mode)
    elif backend == "triton":
        from .kernels.ref_attention import ref_attention  # lazily: triton is only needed on this path
        out = ref_attention(q, k, v, ref_k, ref_v, ref_mask, lambda_ref, lambda_txt, n_txt, mask_mode)
    else:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def subject_mask_arg(ref_mask: Tensor | None, q: Tensor, ref_k: Tensor | None) -> Tensor | None:
    """ref_mask (B, R), (1, R) or (R,) (one mask for every item), any dtype (nonzero = subject) -> (B, R) bool on
    q's device, or None. A (B, R) bool mask already on q's device comes back as the same tensor object (the
    triton backend caches its block table per mask tensor)."""
    if ref_mask is None:
        return None
    if not isinstance(ref_mask, Tensor):
        raise TypeError(f"ref_mask must be a tensor (B, R), got {type(ref_mask).__name__}")
    if ref_k is None:
        if ref_mask.numel():
            raise ValueError(f"ref_mask given ({tuple(ref_mask.shape)}) but there are no reference keys (ref_k)")
        return None
    B, R = q.shape[0], ref_k.shape[2]
    if tuple(ref_mask.shape) not in ((B, R), (1, R), (R,)):
        raise ValueError(f"ref_mask has shape {tuple(ref_mask.shape)}; expected (B, R) = ({B}, {R}), (1, {R}) "
                         f"or ({R},) for R = ref_k.shape[2] reference keys")
    m = ref_mask if ref_mask.dtype == torch.bool else ref_mask != 0
    m = m.to(q.device)
    return m if m.dim() == 2 and m.shape[0] == B else m.reshape(1, R).expand(B, R)


def auto_backend(q: Tensor, reference: bool = True) -> str:
    """The fused kernel for the masked, λ-scaled operation on CUDA; plain joint attention (no reference keys,
    no λ) stays on SDPA, whose flash/cuDNN kernels are the strongest known for that case."""
    if reference and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128) \
            and _have_triton():
        return "triton"
    return "sdpa"


@functools.cache
def _have_triton() -> bool:  # looked up once, not on every attention call
    return importlib.util.find_spec("triton") is not None


def key_scales(B: int, R: int, Lk: int, n_txt: int, lambda_ref, lambda_txt, device) -> Tensor:
    """Per-key logit scale s (B, R + Lk): λ_r on the R reference keys, λ_p on the n_txt text keys, 1 on the rest."""
    s = torch.ones(B, R + Lk, device=device, dtype=torch.float32)
    s[:, :R] = torch.as_tensor(lambda_ref, dtype=torch.float32, device=device).reshape(-1, 1)
    s[:, R:R + n_txt] = torch.as_tensor(lambda_txt, dtype=torch.float32, device=device).reshape(-1, 1)
    return s


def check_args(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor | None, ref_v: Tensor | None, n_txt) -> None:
    """The named errors every backend shares (the triton kernel checks the same, plus its own limits)."""
    if (ref_k is None) != (ref_v is None):
        raise ValueError("pass both ref_k and ref_v, or neither")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if ref_k is not None and ref_k.shape != ref_v.shape:
        raise ValueError(f"ref_k {tuple(ref_k.shape)} and ref_v {tuple(ref_v.shape)} must have the same shape")
    Lk = k.shape[2]
    if Lk == 0:
        raise ValueError("k/v hold no tokens: the joint keys must not be empty")
    if isinstance(n_txt, bool) or not isinstance(n_txt, int) or not 0 <= n_txt <= Lk:
        raise ValueError(f"n_txt must be an int in [0, Lk={Lk}], got {n_txt!r}")


def _masked_ref(ref_k, ref_v, ref_mask):
    """Masked-out reference keys/values replaced by zeros (NaN/Inf stored there must not leak: NaN·0 is NaN)."""
    if ref_k is None or ref_mask is None:
        return ref_k, ref_v
    m = ref_mask.to(device=ref_k.device, dtype=torch.bool)[:, None, :, None]  # (B, 1, R, 1)
    return torch.where(m, ref_k, 0), torch.where(m, ref_v, 0)


def attention_reference(q, k, v, ref_k=None, ref_v=None, ref_mask=None, lambda_ref=1.0, lambda_txt=1.0,
                        n_txt=0, mask_mode="exclude") -> Tensor:
    """Readable definition of the operation, fp32 math. Returns (B, H, Lq, D) in q's dtype."""
    check_args(q, k, v, ref_k, ref_v, n_txt)
    ref_k, ref_v = _masked_ref(ref_k, ref_v, ref_mask)
    B, H, Lq, D = q.shape
    R = 0 if ref_k is None else ref_k.shape[2]
    keys = k if R == 0 else torch.cat([ref_k, k], dim=2)        # (B, H, R+Lk, D)
    vals = v if R == 0 else torch.cat([ref_v, v], dim=2)
    s = key_scales(B, R, k.shape[2], n_txt, lambda_ref, lambda_txt, q.device)  # (B, R+Lk)
    logits = (q.float() @ keys.float().transpose(-1, -2)) / math.sqrt(D) * s[:, None, None, :]
    vals = vals.float()
    if R and ref_mask is not None:
        m = ref_mask.to(torch.bool)[:, None, None, :]           # (B, 1, 1, R)
        if mask_mode == "exclude":
            logits[..., :R] = logits[..., :R].masked_fill(~m, float("-inf"))
        else:  # "zero": K_r ⊙ m gives logit 0, V_r ⊙ m gives a zero value
            logits[..., :R] = logits[..., :R].masked_fill(~m, 0.0)
            vals = torch.cat([vals[:, :, :R] * m.transpose(-1, -2), vals[:, :, R:]], dim=2)
    return (logits.softmax(dim=-1) @ vals).to(q.dtype)


def attention_sdpa(q, k, v, ref_k=None, ref_v=None, ref_mask=None, lambda_ref=1.0, lambda_txt=1.0,
                   n_txt=0, mask_mode="exclude") -> Tensor:
    """The same operation through F.scaled_dot_product_attention: λ folded into the keys (s·(q·k) = q·(s·k)),
    the mask as a boolean attn_mask ("exclude") or folded into K_r and V_r ("zero"). λ is split so that nothing
    overflows in fp16: the keys are scaled by s / max|s| (at most 1) and SDPA's own scale is max|s| / √D."""
    check_args(q, k, v, ref_k, ref_v, n_txt)
    R = 0 if ref_k is None else ref_k.shape[2]
    plain = R == 0 and _is_one(lambda_txt)
    if plain:
        return F.scaled_dot_product_attention(q, k, v)
    ref_k, ref_v = _masked_ref(ref_k, ref_v, ref_mask)
    B = q.shape[0]
    keys = k if R == 0 else torch.cat([ref_k, k], dim=2)
    vals = v if R == 0 else torch.cat([ref_v, v], dim=2)
    s = key_scales(B, R, k.shape[2], n_txt, lambda_ref, lambda_txt, q.device)
    smax = max([1.0] + ([_absmax(lambda_ref)] if R else []) + ([_absmax(lambda_txt)] if n_txt else []))
    keys = keys * (s / smax)[:, None, :, None].to(keys.dtype)
    attn_mask = None
    if R and ref_mask is not None:
        m = ref_mask.to(device=q.device, dtype=torch.bool)
        if mask_mode == "exclude":
            attn_mask = torch.cat([m, m.new_ones(B, k.shape[2])], dim=1)[:, None, None, :]
        else:
            mr = torch.cat([m, m.new_ones(B, k.shape[2])], dim=1)[:, None, :, None].to(keys.dtype)
            keys, vals = keys * mr, vals * mr
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_mask, scale=smax / math.sqrt(q.shape[-1]))


def _absmax(x) -> float:
    return abs(float(x)) if not isinstance(x, Tensor) else float(x.detach().abs().max())


def _is_one(x) -> bool:
    return (isinstance(x, (int, float)) and x == 1.0) or (isinstance(x, Tensor) and bool((x == 1).all()))
