"""Exact tiled execution of the autoencoder's full-resolution layers (`AutoEncoder.encode/decode(tile=...)`).

Tiling (`tile=` pixels, for large images; inference only). The only global operations are the mid-block
attention and the GroupNorm statistics. The low-resolution part (encoder mid/out, decoder conv_in/mid, all at
H/8 x W/8) runs on the whole latent, so attention is exact. The full-resolution part runs one layer at a time
(conv_in, each ResnetBlock, each Down/Upsample, norm_out + conv_out), each on crops of about tile x tile
samples, widened by the layer's reach (1 sample per 3x3 conv) and cut back to their cores, which tile the
image (`map_tiles`); the cores are assembled into the whole-image tensor that the next layer reads. Every
GroupNorm uses the whole image's statistics: a ResnetBlock's norm1 those of its input (summed tile by tile),
its norm2 those of conv1's output, summed by a first pass over the tiles that keeps nothing else; a second pass
runs conv1 again and conv2 (`tiled_resnet`). So tiled == untiled up to float rounding (measured on the tiny
AE: max abs diff ~5e-6 at outputs of magnitude ~5, tests/test_autoencoder.py), unlike diffusers' tiled VAE,
whose per-tile GroupNorm statistics and attention change the result (bench/RESULTS.md). A layer whose input fits
in one tile runs untiled.
"""
from __future__ import annotations

from functools import partial
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def spans(n: int, tile: int) -> list[tuple[int, int]]:
    """[0, n) cut into cores of `tile` samples, the last one partial."""
    return list(pairwise([*range(0, n, tile), n]))


def map_tiles(fn, x: Tensor, tile: int, halo: int, scale: float = 1.0, moments: int = 0):
    """fn(x) for a spatially local fn (reach <= `halo` input samples, output `scale` x its input), run on crops
    of x (B, C, H, W): cores of tile x tile (the last ones partial) that tile the image, each widened by `halo`
    on every side (clipped at the image, where fn's own zero padding is the true one) and cut back to its core
    after fn, so the result equals fn(x) up to float rounding. moments=G: return instead the GroupNorm(G)
    moments of fn(x) (see `group_moments`), summed over the cores, without keeping fn(x)."""
    B, _, H, W = x.shape
    out, acc = None, 0
    for r0, r1 in spans(H, tile):
        for c0, c1 in spans(W, tile):
            a, c = max(r0 - halo, 0), max(c0 - halo, 0)
            y = fn(x[:, :, a:r1 + halo, c:c1 + halo])
            top, left = round((r0 - a) * scale), round((c0 - c) * scale)  # the core, within the crop
            y = y[:, :, top:top + round((r1 - r0) * scale), left:left + round((c1 - c0) * scale)]
            if moments:
                acc = acc + group_moments(y, moments)
                continue
            if out is None:
                out = y.new_empty(B, y.shape[1], round(H * scale), round(W * scale))
            out[:, :, round(r0 * scale):round(r1 * scale), round(c0 * scale):round(c1 * scale)] = y
    return acc if moments else out


def identity(x: Tensor) -> Tensor:
    return x


def group_moments(x: Tensor, G: int) -> Tensor:
    """(B, C, h, w) -> (3, B, G) fp64: per group the sum, the sum of squares and the count of x's samples."""
    B, n = x.shape[0], x[0].numel() // G
    s1 = x.sum((2, 3), dtype=torch.float32).double().view(B, G, -1).sum(-1)  # per channel in fp32, then fp64
    s2 = (torch.linalg.vector_norm(x, dim=(2, 3), dtype=torch.float32).double() ** 2).view(B, G, -1).sum(-1)
    return torch.stack([s1, s2, torch.full_like(s1, n)])


def group_norm(mod: nn.GroupNorm, m: Tensor, h: Tensor) -> Tensor:
    """mod(h) with the statistics of moments `m` (the whole image's) instead of h's own."""
    (B, C), G = h.shape[:2], mod.num_groups
    mean = m[0] / m[2]
    var = (m[1] / m[2] - mean * mean).clamp_min(0).float()
    a = torch.rsqrt(var + mod.eps).repeat_interleave(C // G, dim=1) * mod.weight.float()  # (B, C)
    b = mod.bias.float() - mean.float().repeat_interleave(C // G, dim=1) * a
    return torch.addcmul(b[..., None, None].to(h.dtype), h, a[..., None, None].to(h.dtype))


def resnet(blk: nn.Module, m1: Tensor, m2: Tensor | None, x: Tensor) -> Tensor:
    """blk(x) with GroupNorm moments m1, m2 (whole image); m2=None: stop after conv1 (to gather norm2's)."""
    h = blk.conv1(F.silu(group_norm(blk.norm1, m1, x), inplace=True))
    if m2 is None:
        return h
    h = blk.conv2(F.silu(group_norm(blk.norm2, m2, h), inplace=True))
    return (x if blk.nin_shortcut is None else blk.nin_shortcut(x)) + h


def tiled_resnet(blk: nn.Module, x: Tensor, tile: int) -> Tensor:
    """blk(x), tiled: norm1's moments from x itself, norm2's from a pass of conv1 over the tiles, then the output
    pass (conv1 again, conv2). Reach: two 3x3 convs, so a halo of 2."""
    if max(x.shape[-2:]) <= tile:
        return blk(x)
    m1 = map_tiles(identity, x, tile, 0, moments=blk.norm1.num_groups)  # tile by tile: no full-size temporaries
    m2 = map_tiles(partial(resnet, blk, m1, None), x, tile, 2, moments=blk.norm2.num_groups)
    return map_tiles(partial(resnet, blk, m1, m2), x, tile, 2)
