"""Flow-matching sampling for FLUX: schedule, 2x2 packing, position ids, seeded noise, and the one Euler loop.
All pure functions except `denoise`, which only calls the model (and a method's reference branch, if given).

Time runs from t = 1 (pure noise) to t = 0 (image); x_t = (1 - t) x_0 + t ε and the model predicts the velocity
v = ε - x_0, so an Euler step is x ← x + (t_next - t) v. FLUX.1-dev shifts the schedule towards high noise with
mu linear in the image token count (256 → 0.5, 4096 → 1.15); schnell uses the plain linear schedule. A
checkpoint's scheduler_config.json says which (FlowSchedule). True CFG with a negative prompt: `denoise(negative=)`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

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


@dataclass(frozen=True)
class FlowSchedule:
    """The time shift of a `scheduler/scheduler_config.json` (diffusers' FlowMatchEulerDiscreteScheduler).
    dynamic (`use_dynamic_shifting`): mu = calculate_mu(image tokens, base/max seq len, base/max shift), as dev;
    else the fixed shift t -> shift·t / (1 + (shift - 1)·t) (shift 1: the plain linear schedule, as schnell)."""
    dynamic: bool = True
    shift: float = 1.0
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    # options diffusers' scheduler has that FLUX checkpoints leave off; refused rather than silently ignored
    UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                   "invert_sigmas", "use_flow_sigmas", "stochastic_sampling")

    @classmethod
    def from_config(cls, cfg: dict, where: str = "scheduler config") -> FlowSchedule:
        on = [k for k in cls.UNSUPPORTED if cfg.get(k)]
        if cfg.get("time_shift_type", "exponential") != "exponential":
            on.append(f"time_shift_type={cfg['time_shift_type']!r}")
        if on:
            raise ValueError(f"{where}: unsupported scheduler option(s) {', '.join(on)} (minidit implements "
                             "FLUX's flow-matching Euler schedule: dynamic or fixed shift only)")
        return cls(dynamic=bool(cfg.get("use_dynamic_shifting", False)), shift=float(cfg.get("shift", 1.0)),
                   base_seq_len=int(cfg.get("base_image_seq_len", 256)),
                   max_seq_len=int(cfg.get("max_image_seq_len", 4096)),
                   base_shift=float(cfg.get("base_shift", 0.5)), max_shift=float(cfg.get("max_shift", 1.15)))

    @property
    def shifting(self) -> bool:
        return self.dynamic or self.shift != 1.0

    def mu(self, image_seq_len: int) -> float:
        return calculate_mu(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)

    def timesteps(self, steps: int, image_seq_len: int) -> Tensor:
        """steps + 1 timesteps from 1 to 0 (float32), as diffusers' FluxPipeline + this scheduler config."""
        if self.dynamic:
            return get_schedule(steps, image_seq_len, shift=True, mu=self.mu(image_seq_len))
        ts = get_schedule(steps, image_seq_len, shift=False).double()
        return (self.shift * ts / (1 + (self.shift - 1) * ts)).float()


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


Seed = int | torch.Generator | list[int] | list[torch.Generator] | None


def generator(seed: Seed, batch: int):
    """A seed as diffusers' `generator=`: an int -> a new CPU generator seeded with it; a list (of ints or
    generators) -> one generator per image (checked against `batch`); a Generator or None as it is."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"got {len(seed)} seeds/generators for {batch} images")
        return [generator(s, 1) for s in seed]
    if isinstance(seed, torch.Generator) or seed is None:
        return seed
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise ValueError(f"seed must be an int, a torch.Generator or a list of them, got {seed!r}")
    return torch.Generator("cpu").manual_seed(int(seed))


def randn(shape: tuple[int, ...], gen) -> Tensor:
    """fp32 normal noise of `shape` (B first) drawn on the generator's device, as diffusers' `randn_tensor`:
    one generator draws the whole batch; a list draws image i from generator i."""
    if isinstance(gen, list):
        return torch.cat([randn((1, *shape[1:]), g) for g in gen])
    return torch.randn(shape, generator=gen, device=gen.device if gen is not None else "cpu", dtype=torch.float32)


def noise(batch: int, height: int, width: int, seed: Seed, device=None, dtype=torch.float32) -> Tensor:
    """Packed initial noise, seed-identical to diffusers' FluxPipeline: fp32 from a CPU generator (or the given
    generator's device). seed int: one generator draws the whole (B, 16, h, w) batch (what diffusers does with
    one generator); a list: one generator per image (diffusers' list of generators), so image i is
    reproducible alone; a torch.Generator: drawn from it (advancing it); None: torch's global generator."""
    h, w = latent_size(height, width)
    return pack(randn((batch, 16, h, w), generator(seed, batch))).to(device=device, dtype=dtype)


class Progress:
    """A one-line progress bar with it/s on stderr (no dependency)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "denoise"):
        self.total, self.enabled, self.desc, self.n, self.t0 = total, enabled, desc, 0, time.perf_counter()

    def update(self) -> None:
        self.n += 1
        if self.enabled:
            dt = time.perf_counter() - self.t0
            rate = f"{self.n}/{self.total} {self.n / max(dt, 1e-9):.2f} it/s"
            if not sys.stderr.isatty():  # a log file or pipe: plain lines, about ten of them, no \r
                if self.n == self.total or self.n % max(1, -(-self.total // 10)) == 0:
                    print(f"{self.desc} {rate}", file=sys.stderr, flush=True)
                return
            bar = "#" * int(20 * self.n / self.total)
            print(f"\r{self.desc} [{bar:<20}] {rate}", end="\n" if self.n == self.total else "",
                  file=sys.stderr, flush=True)


def guidance_vector(model, batch: int, guidance: float | None, device=None, dtype=torch.float32) -> Tensor | None:
    """(B,) guidance for guidance-distilled models (dev); None for schnell (no guidance embedding)."""
    if not model.cfg.guidance_embed:
        return None
    if guidance is None:
        raise ValueError("this model is guidance-distilled (FLUX.1-dev): pass a guidance value (default 3.5)")
    return torch.full((batch,), float(guidance), device=device, dtype=dtype)


@dataclass
class BranchInputs:
    """The extra batch items a personalization method puts in front of the targets for one step: the model sees
    the batch [branch items; targets] and `state` (a refstate.RefState) tells it what the items do."""
    x: Tensor            # (n, N, 64) the items' latents at this step
    ids: Tensor          # (n, N, 3) their image position ids
    txt: Tensor          # (n, L, C) their prompt's T5 states
    txt_ids: Tensor      # (n, L, 3)
    vec: Tensor          # (n, V) their CLIP vectors
    t: Tensor            # (n,) the time the model is told for them
    state: object        # the RefState of this forward
    cond: Tensor | None = None  # (n, N, C) their own channel conditioning when the targets have `img_cond`
    separate: bool = False      # run the items alone first (their state keeps what the targets read: RefState.kept),
                                # then the targets alone; no items: the rows were kept before (refcache.py)


@torch.no_grad()
def denoise(model, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: Tensor,
            guidance: float | None = 3.5, progress: bool = False,
            negative: tuple[Tensor, Tensor, Tensor] | None = None, true_cfg_scale: float = 1.0,
            branch=None, desc: str = "denoise", img_cond: Tensor | None = None, img_cond_seq: Tensor | None = None,
            img_cond_seq_ids: Tensor | None = None) -> Tensor:
    """Euler integration of the model's velocity over `timesteps` (steps + 1 values, 1 -> 0): the one sampling
    loop of plain generation, img2img, Personalize Anything and FreeCus.
    img (B, N, 64) packed noise; returns the packed clean latent. The update is done in fp32.
    negative: (txt, txt_ids, vec) of a negative prompt for true classifier-free guidance, as diffusers'
    FluxPipeline: a second forward per step and v = v_neg + true_cfg_scale·(v - v_neg) (the caller decides
    when: diffusers does it iff true_cfg_scale > 1 and a negative prompt is given).
    branch: what a personalization method changes per step, an object with two methods:
      `branch.before(i, t, img) -> (img, BranchInputs | None)`: the targets' latents (a method may edit them,
          e.g. Personalize Anything's latent blend) and the reference items to run in front of them this step;
      `branch.after(i, t, t_next, v, img) -> img`: after the targets' Euler step, the velocities (n, N, 64)
          fp32 the model returned for the branch items (none when the RefState dropped them after its last
          layer), for a method whose references have a trajectory of their own; returns the targets' latents.
    The targets' update is the same in every case.
    The FLUX.1 family's conditioning, as BFL's `src/flux/sampling.py: denoise`: img_cond (B, N, C) is
    concatenated to the latents on the channel axis every step (Fill: masked-image latents + packed mask, C = 320;
    Depth/Canny: control-image latents, C = 64); img_cond_seq (B, M, 64) + img_cond_seq_ids (B, M, 3) are
    appended on the sequence axis (Kontext's reference tokens) and the prediction is cut to the first N tokens.
    Branch items bring their own channel conditioning (`BranchInputs.cond`)."""
    if branch is not None and negative is not None:
        raise ValueError("true CFG (a negative prompt) is not combined with a reference branch")
    if branch is not None and img_cond_seq is not None:
        raise ValueError("a reference branch is not combined with Kontext's reference tokens")
    B, N = img.shape[:2]
    check_conditioning(model, img, img_cond, img_cond_seq, img_cond_seq_ids)
    x_in, ids_in = with_conditioning(img_cond, img_cond_seq, img_cond_seq_ids)
    ids = ids_in(img_ids)  # the same every step
    g = guidance_vector(model, B, guidance, img.device, img.dtype)
    bar = Progress(len(timesteps) - 1, progress, desc)
    for i, (t, t_next) in enumerate(zip(timesteps[:-1].tolist(), timesteps[1:].tolist())):
        tt = torch.full((B,), t, device=img.device, dtype=img.dtype)
        extra = None
        if branch is not None:
            img, extra = branch.before(i, t, img)
        x = x_in(img)
        if extra is None:
            pred = model(x, ids, txt, txt_ids, tt, vec, g)[:, :N]
        else:  # the batch [branch items; targets], or the items' own pass and then the targets'
            n = extra.x.shape[0]
            if (img_cond is None) != (extra.cond is None):
                raise ValueError("the branch items need their own conditioning exactly when the targets have img_cond")
            xb = extra.x if extra.cond is None else torch.cat([extra.x, extra.cond.to(extra.x)], dim=-1)
            if extra.separate:
                v_branch = (model(xb, extra.ids, extra.txt, extra.txt_ids, extra.t, extra.vec,
                                  guidance_vector(model, n, guidance, img.device, img.dtype), ref=extra.state).float()
                            if n else xb.new_zeros(0))
                pred = model(x, ids, txt, txt_ids, tt, vec, g, ref=extra.state.for_targets()).float()
            else:
                gb = guidance_vector(model, n + B, guidance, img.device, img.dtype)
                pred = model(torch.cat([xb, x]), torch.cat([extra.ids, ids]), torch.cat([extra.txt, txt]),
                             torch.cat([extra.txt_ids, txt_ids]), torch.cat([extra.t, tt]),
                             torch.cat([extra.vec, vec]), gb, ref=extra.state).float()
                v_branch, pred = pred[:pred.shape[0] - B], pred[pred.shape[0] - B:]
        if negative is not None:
            neg = model(x, ids, negative[0], negative[1], tt, negative[2], g)[:, :N]
            pred = neg + true_cfg_scale * (pred - neg)
        img = (img.float() + (t_next - t) * pred.float()).to(img.dtype)
        if extra is not None:
            img = branch.after(i, t, t_next, v_branch, img)
        bar.update()
    return img


VARIANT_NEEDS = {"fill": "the image and mask of pipe.fill (minidit fill)",
                 "control": "a control image (control_image= / --control)"}


def check_conditioning(model, img: Tensor, img_cond: Tensor | None, img_cond_seq: Tensor | None,
                       img_cond_seq_ids: Tensor | None) -> None:
    """One-line errors before the first step: the channel conditioning must fill the model's img_in width
    (a Fill or control model without its conditioning, or conditioning on a dev model), shapes must agree."""
    width = img.shape[-1] + (0 if img_cond is None else img_cond.shape[-1])
    if width != getattr(model.cfg, "in_channels", width):  # (a test's stand-in model may not say)
        variant = model.cfg.variant
        need = VARIANT_NEEDS.get(variant, "no channel conditioning (it is not a Fill or Depth/Canny model)")
        raise ValueError(f"this FLUX.1 {variant} model (img_in width {model.cfg.in_channels}) needs {need}; "
                         f"got {width} input channels")
    if img_cond is not None and img_cond.shape[:2] != img.shape[:2]:
        raise ValueError(f"img_cond must be (B, N, C) like the latents {tuple(img.shape[:2])}, "
                         f"got {tuple(img_cond.shape)}")
    if (img_cond_seq is None) != (img_cond_seq_ids is None):
        raise ValueError("img_cond_seq and img_cond_seq_ids go together")
    if img_cond_seq is not None and (img_cond_seq.shape[0] != img.shape[0] or img_cond_seq.shape[-1] != img.shape[-1]
                                     or img_cond_seq_ids.shape[:2] != img_cond_seq.shape[:2]):
        raise ValueError(f"img_cond_seq must be (B, M, {img.shape[-1]}) with ids (B, M, 3), got "
                         f"{tuple(img_cond_seq.shape)} and {tuple(img_cond_seq_ids.shape)}")


def with_conditioning(img_cond: Tensor | None, img_cond_seq: Tensor | None, img_cond_seq_ids: Tensor | None):
    """-> (latents -> model input, ids -> model ids): the channel and sequence conditioning of `denoise`."""
    def x_in(img: Tensor) -> Tensor:
        x = img if img_cond is None else torch.cat([img, img_cond.to(img)], dim=-1)
        return x if img_cond_seq is None else torch.cat([x, img_cond_seq.to(x)], dim=1)

    def ids_in(ids: Tensor) -> Tensor:
        return ids if img_cond_seq_ids is None else torch.cat([ids, img_cond_seq_ids.to(ids)], dim=1)
    return x_in, ids_in
