"""RF-Inversion (Rout et al. 2024, Alg. 1): a reference image -> the noise its branch starts from at t = 1.

    inv = pipe.invert("cat.png", steps=28, seed=1)        # Inversion(latent=y0, noise=x_T, timesteps, ...)
    back = reconstruct(pipe, inv)                         # personalize.reconstruct: the branch re-traced alone

Personalize Anything inverts each reference with a *controlled* forward ODE from t = 0 (image) to t = 1 (noise),

    Y ← Y + d_i·û,   û = u(Y, s_i) + γ·(u_cond - u(Y, s_i)),   u_cond = (ε - Y) / (1 - s_i),

which pulls Y towards one seeded noise sample ε. γ = 1 (the authors' value) puts the controller fully in charge:
the model's field u is multiplied by 0, so it is never computed, and on minidit's grid (`grid="sampler"`, the
sampler's own grid walked backwards) the result is exactly ε. γ < 1 mixes in the model's own field (γ = 0:
plain Euler inversion) at guidance `guidance` with the prompt `prompt`.

The authors' `invert` (src/pipeline.py) walks i = 0..n-1 with s_i = i/N, N = len(sigmas) = n + 1, as the
controller's and the model's time, but steps by the sampler's shifted step sizes d_i = σ_i - σ_{i+1}
(`grid="released"`). Its γ = 1 result is therefore c·y0 + (1 - c)·ε with c = Π_i (1 - d_i / (1 - i/(n+1))), not
exactly ε (the values of c at common sizes: docs/methods.md).

Why a loop of its own and not sampling.denoise: it integrates the other way (0 -> 1) with a controller that
needs no model call at γ = 1, on a grid that is not the sampler's in the released variant; written as a branch
of the sampling loop it would hide exactly what differs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import sampling, validate
from .masks import image_tensor, resize_image
from .presets import check_choice

GAMMA = 1.0            # RF-Inversion controller strength (the authors' value)
INVERT_GUIDANCE = 0.0  # the authors invert with guidance 0 (RF-Inversion's recommendation)
INVERSION_GRIDS = ("sampler", "released")


@dataclass
class Inversion:
    """A reference image inverted along the sampler's grid: `noise` is where its branch starts at t = 1."""
    latent: Tensor      # (1, N, 64) y0, the packed clean latent
    noise: Tensor       # (1, N, 64) the inverted latent at t = 1
    timesteps: Tensor   # the grid (sampling order, 1 -> 0); generation must use the same one
    height: int
    width: int
    prompt: str


@torch.no_grad()
def invert_latent(model, y0: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: Tensor,
                  noise: Tensor, gamma: float = GAMMA, guidance: float | None = INVERT_GUIDANCE,
                  progress: bool = False, grid: str = "sampler") -> Tensor:
    """Controlled forward ODE from t = 0 to 1: Y += d_i·(u + γ·((ε - Y)/(1 - s_i) - u)), u = model(Y, s_i).
    grid="sampler": s_i, s_{i+1} the reversed sampling grid, d_i = s_{i+1} - s_i (γ = 1 lands exactly on ε).
    grid="released" (src/pipeline.py `invert`): s_i = i/(n+1) for i = 0..n-1 and d_i = σ_i - σ_{i+1}, the
    sampling grid's step sizes in sampling order (γ = 1 lands on c·y0 + (1 - c)·ε, see the module docstring).
    γ = 1 never calls the model (u would be multiplied by 0): `model` and the text may then be None.
    Returns the latent at t = 1."""
    validate.number("gamma", gamma, 0.0, 1.0)
    check_choice("grid", grid, INVERSION_GRIDS)
    B = y0.shape[0]
    g = sampling.guidance_vector(model, B, guidance, y0.device, y0.dtype) if gamma < 1 else None  # model: γ < 1 only
    sig = timesteps.tolist()  # sampling order, 1 -> 0
    n = len(sig) - 1
    if grid == "sampler":
        ts = sig[::-1]
        times, sizes = ts[:-1], [b - a for a, b in zip(ts[:-1], ts[1:])]
    else:
        times, sizes = [i / (n + 1) for i in range(n)], [sig[i] - sig[i + 1] for i in range(n)]
    bar = sampling.Progress(n, progress and gamma < 1, desc="invert")  # γ = 1 is instant: no bar
    y = y0.float()
    for s, d in zip(times, sizes):
        u_cond = (noise.float() - y) / (1.0 - s)
        if gamma < 1:
            u = model(y.to(y0.dtype), img_ids, txt, txt_ids, torch.full((B,), s, device=y0.device, dtype=y0.dtype),
                      vec, g).float()
            u_cond = u + gamma * (u_cond - u)
        y = y + d * u_cond
        bar.update()
    return y.to(y0.dtype)


def invert_encoded(pipe, y0: Tensor, prompt: str, timesteps: Tensor, height: int, width: int, *,
                   gamma: float = GAMMA, guidance: float | None = INVERT_GUIDANCE, seed: int = 0,
                   grid: str = "sampler", progress: bool = False) -> Inversion:
    """Invert an already encoded reference latent y0 (1, N, 64) with ε = sampling.noise(1, H, W, seed)."""
    noise = sampling.noise(1, height, width, seed, pipe.device, pipe.dtype)
    ids = sampling.image_ids(1, height, width, pipe.device)
    if gamma >= 1:  # the controller alone: no model call, no prompt needed
        xT = invert_latent(None, y0, ids, None, None, None, timesteps, noise, gamma, guidance, progress, grid)
    else:
        txt, txt_ids, vec = pipe.encode_prompt([prompt])
        with pipe.use(pipe.transformer) as model:
            xT = invert_latent(model, y0, ids, txt, txt_ids, vec, timesteps, noise, gamma, guidance, progress, grid)
    return Inversion(y0, xT, timesteps, height, width, prompt)


def invert(pipe, image, prompt: str = "", *, steps: int | None = None, height: int | None = None,
           width: int | None = None, gamma: float = GAMMA, guidance: float | None = INVERT_GUIDANCE, seed: int = 0,
           grid: str = "sampler", progress: bool = False) -> Inversion:
    """Encode and invert a reference image (path, PIL or (3, H, W) tensor in [-1, 1]) on the grid of `steps`
    steps at height x width (default: the image's size; a different size resizes the image). ε is
    `sampling.noise(1, H, W, seed)`; `grid` as `invert_latent`."""
    validate.generate_args(height, width, steps, guidance, seed, 1)
    validate.number("gamma", gamma, 0.0, 1.0)
    x = image_tensor(image)
    H, W = (height or x.shape[1]), (width or x.shape[2])
    x = resize_image(x, H, W)
    timesteps = pipe.schedule(steps, H, W)
    y0 = pipe.encode_image(x[None])
    return invert_encoded(pipe, y0, prompt, timesteps, H, W, gamma=gamma, guidance=guidance, seed=seed, grid=grid,
                          progress=progress)
