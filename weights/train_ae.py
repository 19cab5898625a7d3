"""train_tiny's autoencoder: its widths and phases, the world's renders, the ae stage (whole renders, growing
sizes) and the data stage (the scenes encoded once, the latent scale/shift measured)."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidit.autoencoder import AutoEncoder, AutoEncoderConfig

from . import world
from .train_common import SIZE, Ticker, autocast, load_checkpoint, log, lr_factor, optimize, rewarm

# The autoencoder: FLUX's layout (4 levels, x8, 16 latent channels) at width 96 on every level. GroupNorm has 32
# groups at every width (as FLUX's). The decoder's last GroupNorm (norm_out) sees every pixel the picture gets, and
# on a flat area it leaves each group's channels with zero mean and unit variance: with 1 channel per group (width
# 32, the first built-in AE) nothing of the colour survives, with 2 (width 64) only the sign of each pair's
# difference, with 3 one continuous number per group (32 in all). A flat colour that cannot pass the norm reaches
# conv_out only through the zero padding at the border: the frame and the wrong colours of the narrower widths
# (weights/README.md, measured). FLUX itself has 128 channels there (4 per group). 96 on the lower levels too keeps
# the exported AE at 3.3 M parameters (13 MB in the two fp16 layouts).
AE = AutoEncoderConfig(ch=96, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
# autoencoder phases: (steps, pixels, batch, lr, crop_from), each from the previous one's weights; crop_from None:
# whole renders of that many pixels; a number: crops of that many pixels from whole renders of crop_from pixels.
# Crops of the target scale first (cheap steps, and a crop inside a background is a flat image, which a whole
# render never is), then a short phase on whole renders for GroupNorm's whole-image statistics.
AE_PHASES = ((3000, 64, 16, 5e-4, SIZE), (1500, 128, 8, 1e-3, SIZE), (500, SIZE, 4, 3e-4, None))
AE_FINAL = f"ae_phase{len(AE_PHASES) - 1}.safetensors"  # the last phase's weights: what is encoded and exported


def render_array(scene: world.Scene, size: int) -> np.ndarray:
    return np.array(world.render(scene, size))


def world_images(rng: random.Random, n: int, size: int = SIZE, pool=None) -> tuple[list, torch.Tensor]:
    """n scenes and their renders as (n, 3, size, size) in [-1, 1]. The scenes are drawn here, in order; `pool`
    (a multiprocessing pool, --workers) only renders them, so the data do not depend on it."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    arrays = (pool.map if pool is not None else map)(partial(render_array, size=size), scenes)
    x = torch.stack([torch.from_numpy(a) for a in arrays])
    return scenes, x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_ae(path: Path, device: torch.device | str = "cpu") -> AutoEncoder:
    """An autoencoder weights file of this script (any widths: the config is read from the shapes), the EMA
    weights of an ae phase's checkpoint (WORK/ae_phaseN.ckpt.safetensors), e.g. to measure a phase under way, or
    the weights of a light checkpoint (train_common.light_checkpoint), in fp32."""
    sd = load_file(path)
    for prefix in ("ema.", "model."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
            break
    ae = AutoEncoder(AutoEncoderConfig.from_checkpoint(sd))
    ae.load_state_dict(sd)
    return ae.to(device)


def stage_ae(work: Path, steps: int, seed: int, batch: int = 8, size: int = 128, lr: float = 1e-3,
             init: str | None = None, out: str = "ae_phase0.safetensors", device: torch.device = torch.device("cpu"),
             bf16: bool = False, ckpt_every_s: float = 300.0, pool=None, crop_from: int | None = None,
             cfg: AutoEncoderConfig = AE) -> None:
    """Train (or, from `init`, continue training) the autoencoder on whole `size`-pixel world renders (or, with
    `crop_from`, `size`-pixel crops of whole `crop_from`-pixel renders: `crop_batch`), fresh ones every step;
    resumable from WORK/`out`.ckpt (model, EMA, AdamW); writes the EMA weights to WORK/`out`. `cfg`: the widths of
    a new autoencoder (ae_width.py compares some)."""
    torch.manual_seed(seed)
    ae = (load_ae(work / init) if init is not None else AutoEncoder(cfg)).to(device)
    if init is None:
        with torch.no_grad():  # start the posterior narrow (std e^-4), or its noise hides the latent from the decoder
            ae.encoder.conv_out.bias[ae.cfg.z_channels:] = -8.0
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    ckpt, start, fresh = work / out.replace(".safetensors", ".ckpt.safetensors"), 0, False
    if ckpt.exists():
        start, steps = load_checkpoint(ckpt, ae, ema, opt)
        fresh = start > 0 and not opt.state  # a light checkpoint: no AdamW moments
        log(f"ae resumed at step {start} of {steps}" + (" (weights only: lr warmed up again)" if fresh else ""))
    rng = random.Random(seed * 7919 + 1 + start)
    g = torch.Generator().manual_seed(seed + start)
    tick = Ticker(f"ae {size}px", ckpt, ckpt_every_s, every_steps=25)
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup=50) * rewarm(step, start, fresh)
        x = world_images(rng, batch, crop_from or size, pool)[1]
        x = (x if crop_from is None else crop_batch(x, size, rng)).to(device)
        with autocast(device, bf16):
            mean, logvar = ae.encoder(x).float().chunk(2, dim=1)
            noise = torch.randn(mean.shape, generator=g).to(device)
            y = ae.decoder(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise).float()
        rec = (y - x).abs().mean() + F.mse_loss(y, x)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        optimize(ae, opt, ema, rec + 1e-4 * kl, step)
        tick(step, steps, steps, rec.item(), ae, ema, opt)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(work / out),
              metadata={"final_rec": "" if tick.avg is None else f"{tick.avg:.5f}", "steps": str(steps),
                        "size": str(size)})


def crop_batch(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """One `size`-pixel crop of each render x (B, 3, R, R): on each axis at the render's border (either side) half
    the time, anywhere otherwise. A crop inside a background is a flat image, which a whole render never is (the
    side experiment in weights/README.md: the same PSNR as whole small renders, flat colours far better)."""
    R = x.shape[-1]

    def offset() -> int:
        u = rng.random()
        return 0 if u < 0.25 else R - size if u < 0.5 else rng.randrange(R - size + 1)
    return torch.stack([img[:, a:a + size, b:b + size] for img in x for a, b in [(offset(), offset())]])


@torch.no_grad()
def stage_data(work: Path, n: int, seed: int, device: torch.device = torch.device("cpu"), bf16: bool = False,
               pool=None) -> None:
    ae = load_ae(work / AE_FINAL, device)
    rng = random.Random(seed + 2)
    scenes, means, t0 = [], [], time.time()
    for start in range(0, n, 32):
        s, x = world_images(rng, min(32, n - start), pool=pool)
        with autocast(device, bf16):
            means.append(ae.encoder(x.to(device)).float().chunk(2, dim=1)[0].cpu())
        scenes += s
        if start % 640 == 0:
            log(f"data {start}/{n} ({time.time() - t0:.0f} s)")
    z = torch.cat(means)
    shift, std = z.mean().item(), z.std().item()
    if (work / "factors.json").exists():  # --init-from: keep the latent space the initial DiT was trained in
        f = json.loads((work / "factors.json").read_text())
        log(f"data: measured shift {shift:.4f}, scale {1 / std:.4f}; kept the initial repository's")
        scale, shift = f["scale_factor"], f["shift_factor"]
        latents = ((z - shift) * scale).half().contiguous()
    else:
        scale = 1.0 / std
        latents = ((z - shift) / std).half().contiguous()
    cfg = replace(ae.cfg, scale_factor=scale, shift_factor=shift)
    (work / "cover.safetensors").unlink(missing_ok=True)  # the object cover of the scenes encoded before, if any
    save_file({"latents": latents}, str(work / "latents.safetensors"),
              metadata={"scale_factor": repr(cfg.scale_factor), "shift_factor": repr(cfg.shift_factor)})
    (work / "scenes.json").write_text(json.dumps([asdict(s) for s in scenes]))
    log(f"data done: {n} latents, shift {shift:.4f}, scale {scale:.4f}")
