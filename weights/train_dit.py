"""train_tiny's MMDiT: its config, the rectified-flow loss and time distributions, the dit stage and the tune
stage (the DiT, optionally with both text encoders, trained on)."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minidit import sampling
from minidit.text_encoder import TextEncoder
from minidit.transformer import Flux, FluxConfig

from . import world
from .train_common import SIZE, Ticker, autocast, load_checkpoint, log, lr_factor, optimize

T5_LENGTH = 48
DIT = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=128, mlp_ratio=4.0,
                 num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12), qkv_bias=True,
                 guidance_embed=False)
MU = sampling.calculate_mu((SIZE // 16) ** 2)   # 0.5: FLUX.1-dev's shift at 256 image tokens
T_DISTS = ("logit-normal", "sampler")


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


def sample_batch(scenes: list[world.Scene], batch: int, g: torch.Generator, rng: random.Random):
    """-> (indices, captions): each attribute left out with p = 0.15, the whole caption dropped with p = 0.1."""
    idx = torch.randint(len(scenes), (batch,), generator=g)
    return idx, ["" if rng.random() < 0.1 else world.caption(scenes[i], rng, 0.15) for i in idx.tolist()]


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
