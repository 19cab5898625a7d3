"""What every stage of train_tiny shares: the log line, autocast, the learning-rate schedule, one optimiser
step with its EMA, the ticker that logs and checkpoints, and checkpoints in safetensors (no pickle)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


SIZE = 256            # pixels: 32x32 latents, a 16x16 token grid
EMA = 0.995           # of the exported weights (a ~200-step window)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on `device` (fp32 weights), or none."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def lr_factor(step: int, steps: int, warmup: int = 100) -> float:
    """Linear warm-up, then a cosine down to 5% of the peak at `steps`."""
    return min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))


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


def save_checkpoint(path: Path, model, ema, opt, step: int, steps: int, loss: float) -> None:
    """Model, EMA and AdamW moments in one safetensors file (no pickle), written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for i, st in opt.state_dict()["state"].items():
        tensors[f"opt.{i}.exp_avg"], tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
        tensors[f"opt.{i}.step"] = st["step"].reshape(1).float()
    save_atomic({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                {"step": str(step), "steps": str(steps), "loss": f"{loss:.5f}"})


def save_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    """A safetensors file written beside `path` and renamed into place: a crash never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_checkpoint(path: Path, model, ema, opt) -> tuple[int, int]:
    """Restore model, EMA and AdamW state; -> (steps done, total steps of the run). A light checkpoint
    (`light_checkpoint`: weights only) restores the weights as both model and EMA and leaves AdamW fresh."""
    from safetensors import safe_open
    sd = load_file(path)
    model.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("model.")})
    weights = model.state_dict()
    for k in ema:
        ema[k].copy_(sd[f"ema.{k}"] if f"ema.{k}" in sd else weights[k])
    state = opt.state_dict()
    for i, p in enumerate(model.parameters()):
        if f"opt.{i}.exp_avg" in sd:
            state["state"][i] = {"exp_avg": sd[f"opt.{i}.exp_avg"], "exp_avg_sq": sd[f"opt.{i}.exp_avg_sq"],
                                 "step": sd[f"opt.{i}.step"][0].clone()}
    opt.load_state_dict(state)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return int(meta["step"]), int(meta["steps"])


def light_checkpoint(src: Path, dst: Path) -> None:
    """A checkpoint's EMA weights alone, in fp16, as `model.*` with its step metadata: small enough to commit, so a
    stage survives the machine it ran on (the AE's 96-wide phase 0: 6.6 MB instead of 53). `load_checkpoint`
    resumes from it with EMA = the weights and fresh AdamW moments; the stage then warms its lr up again (`rewarm`)."""
    from safetensors import safe_open
    sd = load_file(src)
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = {f"model.{k[4:]}": (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in sd.items() if k.startswith("ema.")}
    save_atomic(tensors, dst, {**meta, "light": "ema weights, fp16"})


def rewarm(step: int, start: int, fresh: bool, warmup: int = 50) -> float:
    """The lr factor of a stage resumed at `start` without AdamW moments (`fresh`: a light checkpoint): a linear
    warm-up over `warmup` steps from there, as at the start (fresh moments make Adam's first steps full-size);
    else 1."""
    return min(1.0, (step - start + 1) / warmup) if fresh else 1.0
