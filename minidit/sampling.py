"""Flow-matching sampling for FLUX: schedule, 2x2 packing, position ids, seeded noise, the Euler loop.
All pure functions except `denoise`, which only calls the model.

Time runs from t = 1 (pure noise) to t = 0 (image); x_t = (1 - t) x_0 + t ε and the model predicts the velocity
v = ε - x_0, so an Euler step is x ← x + (t_next - t) v. FLUX.1-dev shifts the schedule towards high noise with
mu linear in the image token count (256 → 0.5, 4096 → 1.15); schnell uses the plain linear schedule.
"""
from __future__ import annotations

import math
import sys
import time
import torch
from einops import rearrange
from torch import Tensor


def calculate_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                 base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, t: Tensor, sigma: float = 1.0) -> Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): mu > 0 spends more steps at high noise. t = 0 stays 0."""
    t = t.double()
    out = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    return torch.where(t > 0, out, torch.zeros_like(out))


def get_schedule(steps: int, image_seq_len: int, shift: bool = True, mu: float | None = None) -> Tensor:
    """steps + 1 timesteps from 1 to 0 (float32), time-shifted for dev (`shift=True`) with
    mu = calculate_mu(image_seq_len) unless `mu` is given."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    if shift:
        ts = time_shift(calculate_mu(image_seq_len) if mu is None else mu, ts)
    return ts.float()


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Image size -> latent grid (2 * (H // 16), 2 * (W // 16)); H and W must be multiples of 16."""
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise ValueError(f"height and width must be positive multiples of 16, got {width}x{height} (WxH)")
    return 2 * (height // 16), 2 * (width // 16)


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens of 2x2 patches."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """(B, N, 4C) tokens -> (B, C, h, w) latents of an image of height x width pixels."""
    h, w = latent_size(height, width)
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, device=None) -> Tensor:
    """(B, N, 3) position ids (0, row, col) of the image tokens, row-major like `pack`."""
    h, w = latent_size(height, width)
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(1, -1, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None) -> Tensor:
    return torch.zeros(batch, length, 3, device=device)


def noise(batch: int, height: int, width: int, seed: int | list[int], device=None, dtype=torch.float32) -> Tensor:
    """Packed initial noise, seed-identical to diffusers' FluxPipeline: fp32 from a CPU generator.
    seed int: one generator draws the whole (B, 16, h, w) batch (what diffusers does with one generator);
    seed list: one generator per image (diffusers' list of generators), so image i is reproducible alone."""
    h, w = latent_size(height, width)
    if isinstance(seed, int):
        x = torch.randn((batch, 16, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    else:
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds for {batch} images")
        x = torch.cat([torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(s)) for s in seed])
    return pack(x).to(device=device, dtype=dtype)


class Progress:
    """A one-line progress bar with it/s on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "denoise"):
        self.total, self.enabled, self.desc, self.n, self.t0 = total, enabled, desc, 0, time.perf_counter()

    def update(self) -> None:
        self.n += 1
        if self.enabled:
            dt = time.perf_counter() - self.t0
            bar = "#" * int(20 * self.n / self.total)
            print(f"\r{self.desc} [{bar:<20}] {self.n}/{self.total} {self.n / max(dt, 1e-9):.2f} it/s",
                  end="\n" if self.n == self.total else "", file=sys.stderr, flush=True)


def guidance_vector(model, batch: int, guidance: float | None, device=None, dtype=torch.float32) -> Tensor | None:
    """(B,) guidance for guidance-distilled models (dev); None for schnell (no guidance embedding)."""
    if not model.cfg.guidance_embed:
        return None
    if guidance is None:
        raise ValueError("this model is guidance-distilled (FLUX.1-dev): pass a guidance value (default 3.5)")
    return torch.full((batch,), float(guidance), device=device, dtype=dtype)


@torch.no_grad()
def denoise(model, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: Tensor,
            guidance: float | None = 3.5, progress: bool = False) -> Tensor:
    """Euler integration of the model's velocity over `timesteps` (steps + 1 values, 1 -> 0).
    img (B, N, 64) packed noise; returns the packed clean latent. The update is done in fp32."""
    B = img.shape[0]
    g = guidance_vector(model, B, guidance, img.device, img.dtype)
    bar = Progress(len(timesteps) - 1, progress)
    for t, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
        pred = model(img, img_ids, txt, txt_ids, torch.full((B,), t, device=img.device, dtype=img.dtype), vec, g)
        img = (img.float() + (t_next - t) * pred.float()).to(img.dtype)
        bar.update()
    return img
