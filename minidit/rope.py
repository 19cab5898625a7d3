"""3-axis rotary position embedding (pure functions), as in FLUX.

Each image token has ids (0, row, col) and each text token (0, 0, 0); the head dim D = sum(axes_dim) is split
into per-axis chunks (16, 56, 56 for FLUX), each rotated by its own axis' position. Pairs are interleaved
(x0, x1), (x2, x3), ... and the embedding is kept as 2x2 rotation matrices, like the official code.
"""
import torch
from torch import Tensor


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """pos (B, L) -> rotation matrices (B, L, dim/2, 2, 2), computed in float64 like the official code."""
    assert dim % 2 == 0
    dev = pos.device
    fp64 = dev.type not in ("mps",)  # float64 where the device supports it
    dt = torch.float64 if fp64 else torch.float32
    omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dt, device=dev) / dim))  # (dim/2,)
    out = pos.to(dt)[..., None] * omega  # (B, L, dim/2)
    cos, sin = torch.cos(out), torch.sin(out)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*out.shape, 2, 2).float()


def embed_nd(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """ids (B, L, n_axes) -> pe (B, 1, L, D/2, 2, 2), broadcast over heads."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """x (B, H, L, D), pe (B, 1, L, D/2, 2, 2) -> x rotated, in x's dtype (math in fp32)."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)  # (B, H, L, D/2, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)
