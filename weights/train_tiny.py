"""Train the built-in tiny FLUX.1 on the procedural world (weights/world.py), then write it as a FLUX.1
repository in the official layouts (BFL single files and diffusers folders), read by minidit and diffusers alike.

    python -m minidit.weights.train_tiny --work /tmp/tiny --threads 1 --until ae        # the autoencoder alone
    python -m minidit.weights.train_tiny --work /tmp/tiny --dit-steps 10000 --out /tmp/tiny/final   # all stages
    python -m minidit.weights.train_tiny --work /tmp/tiny --device cuda --batch 128 ...  # a GPU: bf16 autocast
    python -m minidit.weights.train_tiny --work /tmp/smoke --smoke                      # seconds: CI's smoke test

How weights/trained was made (the exact commands, times, losses, and what each choice measurably did) is in
weights/README.md; this docstring says what the code does.

Stages (each skipped when its output exists in --work; the ae, dit and tune stages resume from their last
checkpoint, written every few minutes):
  init   (--init-from REPO) an empty work folder seeded from an exported repository (stage_init): its encoders,
         autoencoder (as the last AE phase), latent scale/shift (kept by the data stage) and DiT (a finished DiT
         stage); the stages below then skip or continue from it. Work folders do not travel; repositories do.
  text   the tokenizers and random tiny T5 / CLIP in their Hugging Face layouts (fp16), frozen for the dit stage
         (FLUX trains its MMDiT against frozen encoders; the tune stage can train them jointly). The T5 tokenizer is
         a SentencePiece model trained on the generic tiny corpus plus world captions, so most of the world's words
         are single pieces; T5 gets 48 tokens (tokenizer_2's model_max_length, which minidit reads).
  ae     the autoencoder in the FLUX layout with AE's widths (16 latent channels, x8), trained on whole world
         renders, small ones first (AE_PHASES): L1 + MSE reconstruction + 1e-4 KL (per element); the posterior
         starts narrow (log-variance bias -8) so its noise does not hide the latent; EMA weights are kept. Whole
         renders, never crops: GroupNorm's statistics over a crop are not those of a whole image, and a smaller
         render of the same scene has nearly the same ones.
  data   N world scenes rendered at 256 and encoded (posterior mean) once; scale/shift factors measured on them
         (shift = mean, scale = 1/std) and stored in vae/config.json and ae.safetensors' metadata.
  dit    the MMDiT (FLUX layout, no guidance embedding: schnell-like, so the sampler uses true CFG) with FLUX's
         rectified-flow objective: x_t = (1-t) x0 + t eps, target v = eps - x0; t logit-normal (SD3) then shifted
         with FLUX.1-dev's mu for 256 tokens (mu = 0.5), the schedule it is sampled with. Captions leave out each
         attribute with p = 0.15 and are dropped whole with p = 0.1 (the empty prompt), so classifier-free guidance
         works. AdamW, warm-up then cosine, fp32 weights, EMA 0.995 (what is exported).
  tune   (--tune-steps N) the dit stage's EMA model trained on for N steps more, a fresh AdamW (DiT 2e-4), warm-up
         and cosine. Options: --local-t5 gives the frozen T5 a designed local position bias first
         (tiny_text.local_position_bias); --tune-times sampler draws the times as the sampler spaces its steps
         (train_times); --object-weight K weights each image token's loss by 1 + K x its object coverage
         (object_weights, a deviation from FLUX's plain mean); --tune-text-lr > 0 trains both text encoders
         jointly, and export then writes the tuned T5 and CLIP.
  export the repository: flux1-schnell.safetensors + transformer/, ae.safetensors + vae/, text_encoder(_2)/,
         tokenizer(_2)/, scheduler/ (dev-like dynamic shifting), model_index.json, minidit.json (DEFAULTS); all
         weights fp16.

Devices (--device): every stage runs on the one device given; on CUDA the forward passes run under bf16 autocast
(fp32 weights and optimizer), on the CPU in fp32 (--bf16 / --no-bf16 override). Random draws (scenes, captions,
times, noise) come from CPU generators on every device, so a run's data stream does not depend on the device;
--workers N processes render the world's images for the ae and data stages (the bottleneck on a GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidit import sampling
from minidit.autoencoder import AutoEncoder, AutoEncoderConfig
from minidit.text_encoder import TextEncoder
from minidit.transformer import Flux, FluxConfig

from . import world
from .tiny import MODEL_INDEX, SCHEDULERS
from .tiny_ae import write_tiny_ae
from .tiny_flux import save_bfl, save_diffusers
from .tiny_text import (CORPUS, TINY_T5, local_position_bias, write_clip_tokenizer, write_t5_tokenizer, write_tiny_clip,
                        write_tiny_t5)

SIZE = 256            # pixels: 32x32 latents, a 16x16 token grid
T5_LENGTH = 48
DIT = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128, mlp_ratio=4.0,
                 num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12), qkv_bias=True,
                 guidance_embed=False)
# The autoencoder: FLUX's layout (4 levels, x8, 16 latent channels) at widths 64/64/128/128. GroupNorm has 32
# groups at every width (as FLUX's), so at 32 channels (AutoEncoderConfig.tiny()) each group is a single channel:
# the decoder's last GroupNorm then removes each channel's spatial mean, and a flat colour reaches conv_out only
# through the zero padding at the border (the frame the first built-in autoencoder drew; weights/README.md).
AE = AutoEncoderConfig(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
# autoencoder phases: (steps, render pixels, batch, lr); whole renders, each phase from the previous one's weights
AE_PHASES = ((3000, 64, 16, 5e-4), (1500, 128, 8, 1e-3), (500, SIZE, 4, 3e-4))
AE_FINAL = f"ae_phase{len(AE_PHASES) - 1}.safetensors"  # the last phase's weights: what is encoded and exported
MU = sampling.calculate_mu((SIZE // 16) ** 2)   # 0.5: FLUX.1-dev's shift at 256 image tokens
# minidit.json (minidit/defaults.py): what the exported model is used with when a call does not say
DEFAULTS = {"height": SIZE, "width": SIZE, "steps": 28, "guidance": 3.5, "true_cfg_scale": 4.0, "negative_prompt": "",
            "trained_pixels": [SIZE * SIZE, SIZE * SIZE]}
SCHEDULER = {**SCHEDULERS["dev"]}               # dynamic shifting, as it is trained
EMA = 0.995                                     # of the exported DiT weights (a ~200-step window)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def render_array(scene: world.Scene, size: int) -> np.ndarray:
    return np.array(world.render(scene, size))


def world_images(rng: random.Random, n: int, size: int = SIZE, pool=None) -> tuple[list, torch.Tensor]:
    """n scenes and their renders as (n, 3, size, size) in [-1, 1]. The scenes are drawn here, in order; `pool`
    (a multiprocessing pool, --workers) only renders them, so the data do not depend on it."""
    scenes = [world.sample_scene(rng) for _ in range(n)]
    arrays = (pool.map if pool is not None else map)(partial(render_array, size=size), scenes)
    x = torch.stack([torch.from_numpy(a) for a in arrays])
    return scenes, x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def fp16_folder(folder: Path) -> None:
    """Cast every safetensors file in `folder` to fp16 in place (text encoders are stored like the rest)."""
    for f in folder.glob("*.safetensors"):
        save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, str(f), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------- stages
def stage_text(repo: Path, seed: int) -> None:
    rng = random.Random(seed)
    captions = [world.caption(world.sample_scene(rng), rng, 0.15) for _ in range(3000)]
    write_clip_tokenizer(repo / "tokenizer")
    write_t5_tokenizer(repo / "tokenizer_2", vocab_size=320, model_max_length=T5_LENGTH, corpus=list(CORPUS) + captions)
    write_tiny_clip(repo / "text_encoder", seed=seed)
    write_tiny_t5(repo / "text_encoder_2", seed=seed)
    fp16_folder(repo / "text_encoder")
    fp16_folder(repo / "text_encoder_2")


T5_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def stage_local_t5(repo: Path) -> None:
    """Give the repository's frozen random T5 the designed local position bias (tiny_text.local_position_bias)
    in place of its random one; every other weight is kept. Idempotent."""
    for f in sorted((repo / "text_encoder_2").glob("*.safetensors")):
        sd = load_file(f)
        if T5_BIAS in sd:
            sd[T5_BIAS] = local_position_bias(TINY_T5).to(sd[T5_BIAS].dtype)
            save_file(sd, str(f), metadata={"format": "pt"})


INIT_FILES = ("flux1-schnell.safetensors", "ae.safetensors", "text_encoder", "text_encoder_2", "tokenizer",
              "tokenizer_2")


def init_problem(work: Path, src: Path) -> str | None:
    """Why `--init-from src` cannot seed `work` (one line), or None."""
    if not src.is_dir():
        return f"--init-from {src}: not a folder"
    missing = [f for f in INIT_FILES if not (src / f).exists()]
    if missing:
        return f"--init-from {src}: not a repository written by this script (no {', '.join(missing)})"
    if work.exists() and any(work.iterdir()):
        return f"--init-from: {work} is not empty; give an empty or new --work"
    from safetensors import safe_open
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in Flux(DIT).state_dict().items()}
    with safe_open(str(src / "flux1-schnell.safetensors"), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if have != want:
        return f"--init-from {src}: flux1-schnell.safetensors is not a DiT of this script's shapes (train_tiny.DIT)"
    return None


def stage_init(work: Path, src: Path) -> None:
    """Seed a work folder from an exported repository (e.g. weights/trained), so that later stages continue from
    it on a machine that lacks the original work folder: the repository itself as WORK/repo (its text encoders and
    tokenizers), its autoencoder as the last AE phase, its latent scale/shift (WORK/factors.json, kept by the data
    stage so the DiT's latent space does not move) and its DiT as a finished DiT-stage checkpoint (step 0 of 0,
    EMA = model; --tune-steps trains on from it). fp16 weights are upcast to fp32."""
    from safetensors import safe_open
    with safe_open(str(src / "ae.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    dit = {k: v.float() for k, v in load_file(src / "flux1-schnell.safetensors").items()}  # shapes: init_problem
    shutil.copytree(src, work / "repo")
    ae = {k: v.float().contiguous() for k, v in load_file(src / "ae.safetensors").items()}
    save_file(ae, str(work / AE_FINAL), metadata={"init_from": str(src)})
    default = AutoEncoderConfig.tiny()  # FLUX.1's factors, which a file without them has
    factors = {k: float(meta.get(k, getattr(default, k))) for k in ("scale_factor", "shift_factor")}
    (work / "factors.json").write_text(json.dumps(factors))
    tensors = {**{f"model.{k}": v for k, v in dit.items()}, **{f"ema.{k}": v.clone() for k, v in dit.items()}}
    save_file(tensors, str(work / "dit.safetensors"), metadata={"step": "0", "steps": "0", "loss": "nan",
                                                                "init_from": str(src)})


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` (fp32 weights), or none."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def load_ae(path: Path, device: torch.device | str = "cpu") -> AutoEncoder:
    """An autoencoder weights file of this script (any widths: the config is read from the shapes), or the EMA
    weights of an ae phase's checkpoint (WORK/ae_phaseN.ckpt.safetensors), e.g. to measure a phase under way."""
    sd = load_file(path)
    if any(k.startswith("ema.") for k in sd):
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("ema.")}
    ae = AutoEncoder(AutoEncoderConfig.from_checkpoint(sd))
    ae.load_state_dict(sd)
    return ae.to(device)


def stage_ae(work: Path, steps: int, seed: int, batch: int = 8, size: int = 128, lr: float = 1e-3,
             init: str | None = None, out: str = "ae_phase0.safetensors", device: torch.device = torch.device("cpu"),
             bf16: bool = False, ckpt_every_s: float = 300.0, pool=None) -> None:
    """Train (or, from `init`, continue training) the autoencoder on whole `size`-pixel world renders, fresh ones
    every step; resumable from WORK/`out`.ckpt (model, EMA, AdamW); writes the EMA weights to WORK/`out`."""
    torch.manual_seed(seed)
    ae = (load_ae(work / init) if init is not None else AutoEncoder(AE)).to(device)
    if init is None:
        with torch.no_grad():  # start the posterior narrow (std e^-4), or its noise hides the latent from the decoder
            ae.encoder.conv_out.bias[ae.cfg.z_channels:] = -8.0
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    ckpt, start = work / out.replace(".safetensors", ".ckpt.safetensors"), 0
    if ckpt.exists():
        start, steps = load_checkpoint(ckpt, ae, ema, opt)
        log(f"ae resumed at step {start} of {steps}")
    rng = random.Random(seed * 7919 + 1 + start)
    g = torch.Generator().manual_seed(seed + start)
    tick = Ticker(f"ae {size}px", ckpt, ckpt_every_s, every_steps=25)
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup=50)
        x = world_images(rng, batch, size, pool)[1].to(device)
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


def scene_from_dict(d: dict) -> world.Scene:
    objs = tuple(world.Placed(world.Subject(**o["subject"]), o["size"], o["position"], o["cx"], o["cy"])
                 for o in d["objects"])
    return world.Scene(objs, d["background"], d["bg"], d["bg2"])


def init_dit(cfg: FluxConfig, seed: int) -> Flux:
    """PyTorch's default init, with adaLN-Zero: every modulation and the final projection start at zero, so each
    block starts as the identity (DiT, Peebles & Xie 2023)."""
    torch.manual_seed(seed)
    model = Flux(cfg)
    for name, p in model.named_parameters():
        if "modulation" in name or name.startswith("final_layer.linear"):
            torch.nn.init.zeros_(p)
    return model


def load_data(work: Path) -> tuple[torch.Tensor, list[world.Scene]]:
    """The encoded latents (N, 16, 32, 32) fp16 and their scenes."""
    latents = load_file(work / "latents.safetensors")["latents"]
    return latents, [scene_from_dict(d) for d in json.loads((work / "scenes.json").read_text())]


def object_cover(scenes: list[world.Scene]) -> torch.Tensor:
    """(N, 256): the fraction of each image token's 16x16 pixels that the scene's objects cover (world.object_masks,
    the ground truth), in sampling.pack's row-major token order."""
    cover = [torch.from_numpy(world.object_masks(s, SIZE).sum(0).clip(0, 1)).float() for s in scenes]
    return F.avg_pool2d(torch.stack(cover)[:, None], 16).flatten(1)


def object_weights(work: Path, scenes: list[world.Scene], k: float) -> torch.Tensor:
    """(N, 256) loss weight of each image token: 1 + k x `object_cover` (cached in WORK/cover.safetensors).
    Why: objects cover ~9 % of the tokens, so under the plain mean the background's colour carries nearly all
    the loss and the object's colour word barely moves it. Measured on the previous built-in model (48 held-out
    single-object scenes at t = 0.97): loss 0.142 with the right caption, 0.159 with the object's colour word
    swapped, 0.940 with the background's (weights/README.md)."""
    path = work / "cover.safetensors"
    if path.exists():
        cover = load_file(path)["cover"]
    else:
        cover = object_cover(scenes)
        save_file({"cover": cover.contiguous()}, str(path))
    assert cover.shape == (len(scenes), (SIZE // 16) ** 2), f"{path}: not this work folder's scenes"
    return 1.0 + k * cover


def lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warm-up, then a cosine down to 5% of the peak at `steps`."""
    return min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def sample_batch(scenes: list[world.Scene], batch: int, g: torch.Generator, rng: random.Random):
    """-> (indices, captions): each attribute left out with p = 0.15, the whole caption dropped with p = 0.1."""
    idx = torch.randint(len(scenes), (batch,), generator=g)
    return idx, ["" if rng.random() < 0.1 else world.caption(scenes[i], rng, 0.15) for i in idx.tolist()]


T_DISTS = ("logit-normal", "sampler")
STAGES = ("text", "ae", "data", "dit")  # --until: the stages a run can stop after


def train_times(batch: int, g: torch.Generator, dist: str = "logit-normal") -> torch.Tensor:
    """Training times t in (0, 1), shifted by MU as the sampler's schedule is. "logit-normal": sigmoid(N(0, 1))
    (SD3, what FLUX trains with): only 4.5 % of the draws land above t = 0.9, where the sampler spends 15 % of its
    steps deciding which colour goes where. "sampler": u ~ U(0, 1), the density of the sampler's own steps."""
    u = torch.sigmoid(torch.randn(batch, generator=g)) if dist == "logit-normal" else torch.rand(batch, generator=g)
    return sampling.time_shift(MU, u).float()


def rf_loss(forward, latents: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, img_ids: torch.Tensor,
            g: torch.Generator, t_dist: str = "logit-normal", weight: torch.Tensor | None = None,
            bf16: bool = False) -> torch.Tensor:
    """FLUX's rectified-flow loss: x_t = (1-t) x0 + t eps, target v = eps - x0, t from `train_times`. `weight`
    (B, 256): each image token's weight (`object_weights`); the loss is then the weighted mean. Runs where `txt`
    is; times and noise are drawn from the CPU generator `g`."""
    device = txt.device
    x0 = sampling.pack(latents.to(device).float())                              # (B, 256, 64)
    batch = x0.shape[0]
    t = train_times(batch, g, t_dist).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    with autocast(device, bf16):
        v = forward(xt, img_ids.to(device), txt, sampling.text_ids(batch, txt.shape[1]).to(device), t, vec)
    if weight is None:
        return F.mse_loss(v.float(), eps - x0)
    w = weight.to(device)
    return ((v.float() - (eps - x0)) ** 2).mean(-1).mul(w).sum() / w.sum()


def optimize(model: torch.nn.Module, opt, ema: dict, loss: torch.Tensor, step: int) -> None:
    """One AdamW step (gradients clipped to norm 1) and the EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for k, p in model.state_dict().items():
            ema[k].lerp_(p, 1 - min(EMA, (1 + step) / (10 + step)))


class Ticker:
    """A stage's running loss, a log line every `every_steps` steps, a checkpoint every `every` seconds and at its
    last step."""

    def __init__(self, name: str, ckpt: Path, every: float, every_steps: int = 50):
        self.name, self.ckpt, self.every, self.every_steps = name, ckpt, every, every_steps
        self.t0 = self.last = time.time()
        self.avg = None

    def __call__(self, step: int, steps: int, end: int, loss: float, model, ema, opt) -> None:
        self.avg = loss if self.avg is None else 0.99 * self.avg + 0.01 * loss
        if step % self.every_steps == 0 or step == steps - 1:
            log(f"{self.name} step {step}/{steps} loss {self.avg:.4f} ({time.time() - self.t0:.0f} s)")
        if time.time() - self.last > self.every or step == end - 1:
            save_checkpoint(self.ckpt, model, ema, opt, step + 1, steps, self.avg)
            self.last = time.time()


def stage_dit(work: Path, repo: Path, steps: int, seed: int, batch: int = 32, lr: float = 5e-4,
              ckpt_every_s: float = 300.0, minutes: float | None = None, extend: bool = False,
              compile: bool = False, stop_at: int | None = None, device: torch.device = torch.device("cpu"),
              bf16: bool = False) -> None:
    """`minutes`: instead of a step count, time the first 20 steps and fix the total that fits (logged and
    stored in the checkpoint, so `--dit-steps N` reproduces the run). `compile`: torch.compile the forward
    (measured on the 2-core CPU: 0.56 instead of 0.75 s per step, after ~90 s of compiling). `stop_at`: end the
    stage after that many steps of the run's schedule (the cosine keeps the run's total; the checkpoint records
    the step reached, so a later call resumes from it)."""
    latents, scenes = load_data(work)
    text = TextEncoder.load(repo, device=device, dtype=torch.float32, max_length=T5_LENGTH)
    model, ckpt = init_dit(DIT, seed).to(device), work / "dit.safetensors"
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    start = 0
    if ckpt.exists():
        start, done_of = load_checkpoint(ckpt, model, ema, opt)
        steps = max(done_of, steps if extend else 0)  # --dit-steps beyond the run's own total extends it
        log(f"dit resumed at step {start} of {steps}")
        minutes = None
    g = torch.Generator().manual_seed(seed + start)
    rng = random.Random(seed * 7919 + start)
    img_ids = sampling.image_ids(batch, SIZE, SIZE)
    t0, tick = time.time(), Ticker("dit", ckpt, ckpt_every_s)
    step = start
    while step < (end := steps if stop_at is None else min(steps, stop_at)):  # `steps` may be refitted below
        if minutes is not None and step == start + 20:
            rate = (time.time() - t0) / 20
            steps = max(start + 21, int(minutes * 60 / rate))
            log(f"dit: {rate:.2f} s/step -> {steps} steps in {minutes} minutes")
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps)
        idx, caps = sample_batch(scenes, batch, g, rng)
        with torch.no_grad():
            txt, vec = text.encode(caps)
        loss = rf_loss(forward, latents[idx], txt, vec, img_ids, g, bf16=bf16)
        optimize(model, opt, ema, loss, step)
        tick(step, steps, end, loss.item(), model, ema, opt)
        step += 1


def stage_tune(work: Path, repo: Path, steps: int, seed: int, batch: int = 32, lr: float = 2e-4,
               text_lr: float = 1e-3, ckpt_every_s: float = 300.0, compile: bool = False,
               t_dist: str = "logit-normal", object_weight: float = 0.0, device: torch.device = torch.device("cpu"),
               bf16: bool = False) -> None:
    """The DiT stage's model (its EMA weights, what `export` writes) trained on for `steps` with both text
    encoders trained jointly (at `text_lr`; 0: they stay frozen): a fresh AdamW, warm-up and cosine; resumable
    from WORK/tune.safetensors (keys dit.*, t5.*, clip.*). What the options gave: weights/README.md."""
    latents, scenes = load_data(work)
    weights = object_weights(work, scenes, object_weight) if object_weight else None
    text = TextEncoder.load(repo, device=device, dtype=torch.float32, max_length=T5_LENGTH)
    joint = text_lr > 0
    text.t5.requires_grad_(joint), text.clip.requires_grad_(joint)  # loaded frozen, for inference
    dit = Flux(DIT).to(device)
    model, ckpt = torch.nn.ModuleDict({"dit": dit, "t5": text.t5, "clip": text.clip}), work / "tune.safetensors"
    groups = [{"params": list(dit.parameters()), "base": lr}]
    if joint:
        groups.append({"params": [*text.t5.parameters(), *text.clip.parameters()], "base": text_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.99))
    forward = torch.compile(dit) if compile else dit
    if ckpt.exists():
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        start, steps = load_checkpoint(ckpt, model, ema, opt)
        log(f"tune resumed at step {start} of {steps}")
    else:
        start = 0
        dit.load_state_dict({k[4:]: v for k, v in load_file(work / "dit.safetensors").items() if k.startswith("ema.")})
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1_000_000 + start)
    rng = random.Random(seed * 7919 + 1_000_000 + start)
    img_ids = sampling.image_ids(batch, SIZE, SIZE)
    tick = Ticker("tune", ckpt, ckpt_every_s)
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = group["base"] * lr_factor(step, steps)
        idx, caps = sample_batch(scenes, batch, g, rng)
        with torch.set_grad_enabled(joint):  # as TextEncoder.encode, which runs without gradients
            _, vec = text.clip(text.clip_tokenizer(caps).to(device))
            txt = text.t5(text.t5_tokenizer(caps).to(device))
        w = None if weights is None else weights[idx]
        loss = rf_loss(forward, latents[idx], txt, vec, img_ids, g, t_dist, w, bf16=bf16)
        optimize(model, opt, ema, loss, step)
        tick(step, steps, steps, loss.item(), model, ema, opt)


def save_checkpoint(path: Path, model, ema, opt, step: int, steps: int, loss: float) -> None:
    """Model, EMA and AdamW moments in one safetensors file (no pickle), written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for i, st in opt.state_dict()["state"].items():
        tensors[f"opt.{i}.exp_avg"], tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
        tensors[f"opt.{i}.step"] = st["step"].reshape(1).float()
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"step": str(step), "steps": str(steps), "loss": f"{loss:.5f}"})
    tmp.replace(path)


def load_checkpoint(path: Path, model, ema, opt) -> tuple[int, int]:
    """Restore model, EMA and AdamW state; -> (steps done, total steps of the run)."""
    from safetensors import safe_open
    sd = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    for k in ema:
        ema[k].copy_(sd[f"ema.{k}"])
    state = opt.state_dict()
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in sd:
            state["state"][i] = {"exp_avg": sd[f"opt.{i}.exp_avg"], "exp_avg_sq": sd[f"opt.{i}.exp_avg_sq"],
                                 "step": sd[f"opt.{i}.step"][0].clone()}
    opt.load_state_dict(state)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return int(meta["step"]), int(meta["steps"])


def stage_export(work: Path, repo: Path, out: Path) -> Path:
    """Write the FLUX.1 repository to `out`: every file fp16, both layouts, plus minidit.json (DEFAULTS). Written
    into a new folder beside `out`, then renamed into place (an earlier export at `out` is replaced only then)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_export(work, repo, tmp)
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old")) if out.exists() else None
        if old is not None:
            out.rename(old / "export")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def write_export(work: Path, repo: Path, tmp: Path) -> None:
    shutil.copytree(repo, tmp, dirs_exist_ok=True)
    from safetensors import safe_open
    with safe_open(str(work / "latents.safetensors"), "pt") as f:
        meta = f.metadata()
    ae_sd = {k: v.half() for k, v in load_file(work / AE_FINAL).items()}
    ae_cfg = replace(AutoEncoderConfig.from_checkpoint(ae_sd), scale_factor=float(meta["scale_factor"]),
                     shift_factor=float(meta["shift_factor"]))
    write_tiny_ae(tmp / "ae.safetensors", ae_cfg, sd=ae_sd)
    write_tiny_ae(tmp / "vae", ae_cfg, layout="diffusers", sd=ae_sd)
    tuned = work / "tune.safetensors"
    if tuned.exists():  # the tune stage's EMA weights: the DiT and both text encoders
        sd = load_file(tuned)
        part = {m: {k[len(m) + 5:]: v.half().contiguous() for k, v in sd.items() if k.startswith(f"ema.{m}.")}
                for m in ("dit", "t5", "clip")}
        write_tiny_t5(tmp / "text_encoder_2", sd=part["t5"])
        write_tiny_clip(tmp / "text_encoder", sd=part["clip"])
        dit = part["dit"]
    else:
        sd = load_file(work / "dit.safetensors")
        dit = {k[4:]: v.half().contiguous() for k, v in sd.items() if k.startswith("ema.")}
    save_bfl(dit, DIT, tmp / "flux1-schnell.safetensors")
    save_diffusers(dit, DIT, tmp / "transformer")
    (tmp / "scheduler").mkdir(exist_ok=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    (tmp / "minidit.json").write_text(json.dumps(DEFAULTS, indent=2))


def train_ae_and_data(work: Path, args, device: torch.device, bf16: bool, pool) -> bool:
    """main's ae phases and data stage (each skipped when done); False when --until stops the run here."""
    for i, (steps, size, batch, lr) in enumerate(AE_PHASES):
        out = work / f"ae_phase{i}.safetensors"
        if args.smoke:
            steps, size, batch = 3, 64, 2
        batch = args.ae_batch or batch
        if not out.exists() and not (work / AE_FINAL).exists():
            log(f"stage ae, phase {i}: {steps} steps, whole {size}-pixel renders, batch {batch}, lr {lr}")
            stage_ae(work, steps, args.seed + i, batch=batch, size=size, lr=lr,
                     init=None if i == 0 else f"ae_phase{i - 1}.safetensors", out=out.name, device=device,
                     bf16=bf16, pool=pool)
    if args.until == "ae":
        return False
    if not (work / "latents.safetensors").exists():
        log("stage data")
        stage_data(work, args.images, args.seed, device=device, bf16=bf16, pool=pool)
    return args.until != "data"


def out_problem(work: Path, out: Path) -> str | None:
    """Why the export may not go to `out` (one line), or None: never the work folder, a folder holding it, or
    another of its files; an existing `out` only if it is empty or an earlier export (model_index.json and
    flux1-schnell.safetensors)."""
    w, o = work.resolve(), out.resolve()
    if o == w or w.is_relative_to(o):
        return f"--out {out}: is (or holds) the work folder {work}; the export would replace it"
    if o.is_relative_to(w) and o != w / "repo-final":
        return f"--out {out}: inside the work folder {work} (only its default WORK/repo-final is allowed)"
    earlier = (out / "model_index.json").is_file() and (out / "flux1-schnell.safetensors").is_file()
    if out.exists() and not (out.is_dir() and (earlier or not any(out.iterdir()))):
        return f"--out {out}: exists and is not an earlier export of this script (refusing to replace it)"
    return None


def argument_problem(args) -> str | None:
    """The first out-of-range argument (one line), or None: checked before anything is written."""
    for flag, value, lo in (("--seed", args.seed, 0), ("--images", args.images, 1), ("--dit-steps", args.dit_steps, 1),
                            ("--batch", args.batch, 1), ("--stop-at", args.stop_at, 1), ("--threads", args.threads, 0)):
        if value is not None and value < lo:
            return f"{flag} must be >= {lo}, got {value}"
    if args.dit_minutes is not None and not (math.isfinite(args.dit_minutes) and args.dit_minutes > 0):
        return f"--dit-minutes must be a finite number > 0, got {args.dit_minutes}"
    if not math.isfinite(args.tune_text_lr):
        return f"--tune-text-lr must be finite, got {args.tune_text_lr}"
    return out_problem(Path(args.work), Path(args.out) if args.out else Path(args.work) / "repo-final")


def one_line_errors(fn):
    """A failure of the training tool is one `error:` line (the traceback with MINIDIT_DEBUG=1)."""
    def run(*a, **k):
        try:
            return fn(*a, **k)
        except (ValueError, TypeError, OSError, RuntimeError, KeyError) as e:
            if os.environ.get("MINIDIT_DEBUG"):
                raise
            raise SystemExit(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return run


@one_line_errors
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="working folder (stages resume from it)")
    ap.add_argument("--out", default=None, help="where to write the finished repository (default: WORK/repo-final)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=4000, help="world images encoded for the DiT")
    ap.add_argument("--dit-steps", type=int, default=2500)
    ap.add_argument("--extend", action="store_true", help="resume a finished DiT run and continue it to --dit-steps "
                    "(the cosine schedule is stretched to the new total)")
    ap.add_argument("--dit-minutes", type=float, default=None, help="fit the step count to this budget instead")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--stop-at", type=int, default=None, help="end the DiT stage after this many steps of its "
                    "schedule (then export); a step already reached exports that checkpoint")
    ap.add_argument("--tune-steps", type=int, default=0, help="then train the DiT this many steps more (stage "
                    "tune; 0: no tune stage)")
    ap.add_argument("--tune-text-lr", type=float, default=1e-3, help="the text encoders' learning rate in the "
                    "tune stage (0: they stay frozen)")
    ap.add_argument("--local-t5", action="store_true", help="before the tune stage, give the frozen T5 the designed "
                    "local position bias (each head attends to one neighbour; tiny_text.local_position_bias)")
    ap.add_argument("--tune-times", choices=T_DISTS, default="logit-normal", help="how the tune stage draws its "
                    "training times (train_times)")
    ap.add_argument("--object-weight", type=float, default=0.0, help="the tune stage's loss weight on object "
                    "tokens: 1 + K x their object coverage (object_weights; 0: the plain mean)")
    ap.add_argument("--init-from", default=None, help="seed an empty --work from an exported repository (e.g. "
                    "weights/trained): its encoders, autoencoder, latent factors and DiT (stage_init)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT's forward (faster after ~90 s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="where every stage runs: cpu, cuda, cuda:1, ...")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast of the "
                    "forward passes (default: on for CUDA, off for the CPU)")
    ap.add_argument("--ae-batch", type=int, default=None, help="the autoencoder phases' batch (default: AE_PHASES'; "
                    "larger on a GPU)")
    ap.add_argument("--workers", type=int, default=0, help="processes that render the world's images for the ae "
                    "and data stages (0: the training process; on a GPU the renders are the bottleneck)")
    ap.add_argument("--until", choices=STAGES, default=None, help="stop after this stage (no export)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    args = ap.parse_args(argv)
    if why := argument_problem(args):
        ap.error(why)
    if args.tune_steps < 0:
        ap.error(f"--tune-steps must be >= 0, got {args.tune_steps}")
    if args.tune_text_lr < 0:
        ap.error(f"--tune-text-lr must be >= 0, got {args.tune_text_lr}")
    if args.local_t5 and not args.tune_steps:
        ap.error("--local-t5 needs --tune-steps (the DiT is tuned to the changed T5 features)")
    if not math.isfinite(args.object_weight) or args.object_weight < 0:
        ap.error(f"--object-weight must be a finite number >= 0, got {args.object_weight}")
    if args.object_weight and not args.tune_steps:
        ap.error("--object-weight needs --tune-steps (it weights the tune stage's loss)")
    if args.init_from and (why := init_problem(Path(args.work), Path(args.init_from))):
        ap.error(why)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: not cpu or a CUDA device (cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if args.ae_batch is not None and args.ae_batch < 1:
        ap.error(f"--ae-batch must be >= 1, got {args.ae_batch}")
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    if args.smoke:
        args.images, args.dit_steps, args.batch = 16, 6, 4
        args.tune_steps = args.tune_steps and 4
    work = Path(args.work)
    repo = work / "repo"
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_from:
        log(f"stage init from {args.init_from}")
        try:
            stage_init(work, Path(args.init_from))
        except BaseException:  # init_problem made sure the work folder was new or empty: leave it so
            for p in work.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            raise
    if not (repo / "text_encoder_2").exists():
        log("stage text")
        stage_text(repo, args.seed)
    if args.until == "text":
        return
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers else None
    try:
        done = train_ae_and_data(work, args, device, bf16, pool)
    finally:
        if pool is not None:
            pool.close()
    if not done:
        return
    log("stage dit")
    stage_dit(work, repo, args.dit_steps, args.seed, batch=args.batch, minutes=args.dit_minutes,
              extend=args.extend, compile=args.compile, stop_at=args.stop_at, device=device, bf16=bf16)
    if args.until == "dit":
        return
    if args.tune_steps:
        if args.local_t5:
            log("stage local t5")
            stage_local_t5(repo)
        log("stage tune")
        stage_tune(work, repo, args.tune_steps, args.seed, batch=args.batch, text_lr=args.tune_text_lr,
                   compile=args.compile, t_dist=args.tune_times, object_weight=args.object_weight, device=device,
                   bf16=bf16)
    out = stage_export(work, repo, Path(args.out) if args.out else work / "repo-final")
    log(f"exported {out}")


if __name__ == "__main__":
    main()
