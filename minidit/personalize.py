"""Personalize Anything (Feng et al., 2025), natively: training-free subject personalization, layout control,
multi-subject / subject-scene composition, inpainting and outpainting with FLUX.1.

    images = pipe.personalize("a cat on a beach", Reference("cat.png", mask="cat_mask.png"), placement=(64, 0))
    toys = [Reference("a.png", "a_mask.png"), Reference("b.png", "b_mask.png")]
    images = pipe.personalize("two toys in a garden", toys, placement=[(0, 0, 512, 1024), (512, 0, 512, 1024)])
                                                                # target boxes (x, y, w, h), one per reference
    images = pipe.inpaint("photo.png", "edit_mask.png", "a castle on the hill")
    images = pipe.outpaint("photo.png", "a wide valley", canvas=(1024, 768))
    images = pipe.inpaint("photo.png", "edit_mask.png", "a castle", preset="official")   # the released code

Follow one token from the reference image into the target
-----------------------------------------------------------
1. The reference image is VAE-encoded to a packed latent y0 (N tokens of 64 values; one token = a 16x16 pixel
   patch) and *inverted* (`invert`): a controlled rectified-flow ODE (RF-Inversion, Rout et al. 2024, Alg. 1) runs
   from t = 0 (image) to t = 1 (noise) with the velocity
   û = u(Y, t) + γ (u_cond - u(Y, t)),  u_cond = (ε - Y) / (1 - t)  pulling towards one seeded noise sample ε.
   minidit's grid (`inversion_grid="sampler"`) is the sampler's own grid walked backwards, so with γ = 1 (the
   authors' value: the controller is fully in charge, u is never needed) the inverted latent is exactly ε.
   The authors' `invert` (src/pipeline.py) walks i = 0..n-1 with t_i = i/N, N = len(sigmas) = n + 1, i.e.
   t_i = i/(n+1), in the controller and as the model's time, but steps by the sampler's shifted step sizes
   σ_i - σ_{i+1} (`inversion_grid="released"`). Its γ = 1 latent is therefore c·y0 + (1 - c)·ε with
   c = Π_i (1 - (σ_i - σ_{i+1}) / (1 - i/(n+1))): ≈ 0.0062 at 128², 28 steps (0.0051 at 256², 0.0014 at 512²,
   -0.0026 at 1024², FLUX.1-dev's shift), not exactly ε. γ < 1 mixes in the model's own field (γ = 0: plain
   Euler inversion), at guidance `invert_guidance` (the authors': `source_guidance_scale=0.0`) and with the
   prompt `invert_prompt` (theirs: `source_prompt=""`).
2. Generation runs ONE batch  [ref_0, ..., ref_{n-1}, target_0, ...]  (refstate.py). The reference items start
   from their inverted latents and *re-trace* their image with the controlled reverse ODE
   v̂ = v + η (v_cond - v),  v_cond = (x - y0) / t  (Alg. 2): with η = 1 (steps start·n <= i < stop·n, the
   authors' 0 and 0.99) the reference stays exactly on the path x_t = (1 - t)·y0 + t·ε, so at every step and every
   layer its tokens are the reference image's tokens at the current noise level, computed by the same network as
   the target: nothing is stored, the reference is simply one more batch item. `decay_eta` multiplies η by
   (1 - i/n)^eta_decay_power, as the released pipeline's `decay_eta` / `eta_decay_power` (off in its demos).
3. Pick a subject token at (row, col) of the reference's token grid; its flat index p = row·w + col is in `src`.
   Layout control moves it to p' = p + dy·w + dx in the target (`dst`): a translation by an offset, or the one that
   centres the subject in a target box (masks.translate / box_offset). Patch perturbation (personalization only)
   first (a) dilates or erodes the subject mask with a 5x5 kernel and (b) shuffles which subject token goes where
   inside 3x3 windows (masks.augment_mask, local_shuffle); both are drawn once per image from `seed`. (The
   paper's perturbation is not in the released code: "official" has perturb=False.)
4. Early steps, t > τ (token replacement): in every double and single block, after the row-wise q/k/v projection
   and QK-norm (so exactly "before the projections", refstate.RefState.replace_tokens), the target's q, k and v
   rows at p' are overwritten by the reference's rows at p. RoPE is applied afterwards with the target's own
   position ids, so the token sits at its new place; the target's residual stream and MLP are untouched.
   (src/attn_processor.py overwrites the attention's input hidden states before to_q/to_k/to_v: the same rows.)
5. Later steps, t <= τ (multi-modal attention): no replacement; instead the reference subject tokens join the
   target's joint attention as extra keys/values (`concat=True`), rotated at the target region's positions
   (`positions="target"`, the authors' code) or left unrotated, i.e. at position (0, 0, 0) (`positions="zero"`, the
   paper). The authors also append them as queries whose outputs are dropped; a dropped query changes no other
   output, so minidit does not compute them. The paper (`concat_steps="late"`): only after τ and only for the
   targets, the reference items attend normally. The released code (`concat_steps="all"`, its
   `concept_process=True`, off in every released demo): at every step, replacement steps included, and for every
   batch item, the reference items attending to them too. The target then generates freely around the subject.
6. Each Euler step moves every item; the model returns the targets' velocities and the references' (which the
   controlled ODE mostly overrides). The references leave the batch as soon as nothing reads them any more
   (after the last replacement step when `concat=False`), so the extra cost is one batch item per reference for
   as long as it is used.

τ and time. The sampler's normalised time t goes from 1 (noise) to 0 (image) over `steps` Euler steps; step i
runs at t_i = shift(1 - i/steps) (sampling.get_schedule: the dev time shift, identity for schnell).
`tau_time="steps"` (the paper's "τ = 0.8T", minidit's default): τ is given in the same normalised time before
the shift, i.e. as a fraction of the steps: a step replaces while t_i > τ_t = shift(τ), which is exactly
1 - i/steps > τ, i.e. the first ceil((1 - τ)·steps) steps (`replace_steps`, `tau_threshold`). τ = 0.8: the
first 20 % of the steps replace (28 steps: 6); τ = 1.0: never; τ = 0: always. Editing uses τ = 0.1: the first
90 % replace. `tau_time="shifted"` (src/attn_processor.py: `timestep > self.tau`, with the pipeline passing
`timestep = t/1000` of the shifted scheduler timesteps, cast to the latents' dtype): a step replaces while the
*shifted* t_i > τ (`replace_steps_shifted`); their τ = 0.8 replaces on 13 of 28 steps at 1024² with FLUX.1-dev
(9 at 512²), their demo's 0.5 on 22 resp. 19. `tau_units="percent"` takes τ as the demo's slider value 0..100
(gradio_demo.py passes `tau=tau / 100`).

Editing (inpainting / outpainting): the preserved region is the reference (same place, no perturbation, no
later-stage tokens as in the authors' demo). `blend` (on in the "paper" preset, off in "official"): at the
replacement steps the target's latent inside the preserved region is also set to the reference trajectory.
Why: token replacement only overwrites the q/k/v rows; the target's residual stream and MLP path inside the
preserved region still evolve from its own noise, so without the blend the preserved pixels only approximately
follow the reference (on a random tiny model they do not at all, bench/RESULTS.md "Editing: latent blend");
with it they sit exactly on the reference trajectory until the last replacement step and only the remaining
steps harmonise them with the new content. Neither the paper nor the released code blends: it is minidit's
deviation, switchable. Outpainting pastes the image on a larger black canvas (as the authors' demo does,
gradio_demo.py `predict_outpainting_mask`) and preserves the pasted area; `paste="clip"` (theirs) accepts any
pixel offset and crops what leaves the canvas, `paste="fit"` (minidit) requires the whole image on the canvas.
(Their demo also resizes the input with PIL LANCZOS first: resize it before calling outpaint.)

Multi-subject: one reference branch per subject, injected in order into its own target region; regions must be
disjoint (overlaps are refused with an error: the later subject would silently overwrite the earlier one).
Subject-scene composition: `scene=Reference(scene_image, mask=None)` is one more reference kept in place, its
region = its mask minus the subjects' regions; it is not perturbed.

Masks: greyscale/PNG, white = subject, at the reference image's size (or an (x, y, w, h) pixel box as shorthand,
None = whole image). `mask_rule="area"` (minidit): a token belongs to the subject when at least half of its
16x16 patch is white (masks.token_mask, threshold 0.5); editing keeps a token only when its whole patch is
preserved (threshold 1). `mask_rule="center"` (src/utils.py `create_mask`: a PIL NEAREST resize to the token
grid, then == 255): a token is set when the centre pixel (16·r + 8, 16·c + 8) of its patch is exactly white;
editing keeps a token when that pixel is fully preserved. minidit ships no segmenter: make masks with any tool
(SAM / Grounded-SAM as the authors do, rembg, BiRefNet, or a paint program), or pass a box.

Presets (`preset="paper"` default | `"official"`, the README's table): `PersonalizeSettings` (personalize) and
`EditSettings` (inpaint, outpaint), each with `.paper()` and `.official()`; every field can be overridden by
its own keyword. "official" is the released code (github.com/fenghora/personalize-anything: src/pipeline.py,
src/attn_processor.py, src/utils.py, gradio_demo.py, notebooks): 28 steps, guidance 3.5, inversion with an
empty prompt and γ = 1 (guidance 0) on their grid, generation with η = 1 on steps [0, 0.99·n), τ = 50 on the
shifted time, no perturbation, no concept tokens, centre-pixel masks, no blend, and the VAE posterior *sampled*
(their `encode_image` calls `latent_dist.sample()`; here from a seeded CPU generator, `vae_seed`, default the
run's seed). What it cannot reproduce: their random draws come from torch's global (CUDA) generator — the
inversion's ε (`torch.randn` with generator=None in `invert`), the VAE sample — and the target noise from a
CUDA generator, so seeds do not carry over; their fp16 demo rounds the timesteps to fp16 before comparing with τ
(minidit uses the model dtype, fp32 on CPU); with γ = 1 they still call the model and compute u + 1·(u_cond - u)
(equal to u_cond up to rounding; minidit skips the call); their code supports one target image.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import sampling, validate
from .masks import (PATCH, Reference, augment_mask, box_offset, image_tensor, load_reference, local_shuffle,
                    pixel_mask, pixels_to_tokens, require_nonempty, resize_image, token_indices, token_mask,
                    token_mask_rule, translate)
from .presets import PRESET, Settings, check_choice
from .refstate import RefState

TAU = 0.8             # personalization: the first 20 % of the steps replace tokens
TAU_EDIT = 0.1        # inpainting / outpainting: the first 90 % replace
TAU_OFFICIAL = 50.0   # gradio_demo.py: the Tau slider's default, in percent, compared with the shifted time
GAMMA = 1.0           # RF-Inversion controller strength (inversion)
ETA = 1.0             # RF-Inversion controller strength (reference branch during generation)
START, STOP = 0.0, 0.99
INVERT_GUIDANCE = 0.0  # the authors invert with guidance 0 (RF-Inversion's recommendation)
SHUFFLE_WINDOW = 3
MORPH_KERNEL = 5
POSITIONS = ("target", "zero")
TAU_UNITS = ("fraction", "percent")
TAU_TIMES = ("steps", "shifted")
CONCAT_STEPS = ("late", "all")
INVERSION_GRIDS = ("sampler", "released")
PA_MASK_RULES = ("area", "center")
PASTES = ("fit", "clip")


# --------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class _RFSettings(Settings):
    """Fields shared by personalization and editing (see the module docstring for each)."""
    tau: float = TAU                   # when tokens are replaced (see tau_units, tau_time)
    tau_units: str = "fraction"        # "fraction": τ in [0, 1]; "percent": 0..100, the demo's slider (τ/100)
    tau_time: str = "steps"            # "steps": τ is a step fraction (paper); "shifted": vs the shifted time
    concat: bool = True                # later-stage reference tokens in the targets' attention
    concat_steps: str = "late"         # "late": after τ, targets only (paper); "all": every step and item
    positions: str = "target"          # RoPE of the concatenated tokens: "target" region or "zero"
    mask_rule: str = "area"            # pixel mask -> tokens: "area" (minidit) or "center" (create_mask)
    inversion_grid: str = "sampler"    # "sampler": the sampler's grid backwards; "released": t_i = i/(n+1)
    gamma: float = GAMMA               # inversion controller strength
    invert_guidance: float = INVERT_GUIDANCE  # guidance of the inversion's model calls (γ < 1 only)
    invert_prompt: str | None = None   # inversion prompt; None: the reference's own prompt
    eta: float = ETA                   # reference-branch controller strength
    start: float = START               # η acts on steps [start·n, stop·n)
    stop: float = STOP
    decay_eta: bool = False            # η·(1 - i/n)^eta_decay_power (the released pipeline's option)
    eta_decay_power: float = 1.0
    vae_sample: bool = False           # VAE posterior sample (True) or mean (False) of the reference
    vae_seed: int | None = None        # CPU generator seed of that sample; None: the run's seed

    def __post_init__(self):
        check_choice("tau_units", self.tau_units, TAU_UNITS)
        check_choice("tau_time", self.tau_time, TAU_TIMES)
        check_choice("concat_steps", self.concat_steps, CONCAT_STEPS)
        check_choice("positions", self.positions, POSITIONS)
        check_choice("mask_rule", self.mask_rule, PA_MASK_RULES)
        check_choice("inversion_grid", self.inversion_grid, INVERSION_GRIDS)
        top = 100.0 if self.tau_units == "percent" else 1.0
        if not 0.0 <= float(self.tau) <= top:
            raise ValueError(f"tau must be in [0, {top:g}] with tau_units={self.tau_units!r} (a fraction of the "
                             f"normalised time: 0.8 = replace while t > 0.8; percent: the authors' slider 0..100), "
                             f"got {self.tau}")
        if self.tau_units == "percent" and 0 < float(self.tau) < 1:
            warnings.warn(f"tau={self.tau} in percent is below 1 %: did you mean tau_units='fraction'?",
                          stacklevel=3)
        for name in ("gamma", "eta"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(f"need 0 <= start <= stop <= 1, got start={self.start}, stop={self.stop}")
        validate.number("eta_decay_power", self.eta_decay_power, 0.0)
        if self.invert_guidance is not None:
            validate.number("invert_guidance", self.invert_guidance, 0.0, validate.MAX_GUIDANCE)
        if self.vae_seed is not None:
            validate.seed(self.vae_seed)

    @property
    def tau_value(self) -> float:
        """τ as a fraction in [0, 1] (percent / 100)."""
        return float(self.tau) / 100.0 if self.tau_units == "percent" else float(self.tau)

    def replace_steps(self, timesteps: Tensor, dtype: torch.dtype = torch.float32) -> int:
        """How many early steps replace tokens on this grid (steps + 1 timesteps, sampling order)."""
        steps = len(timesteps) - 1
        if self.tau_time == "shifted":
            return replace_steps_shifted(self.tau_value, timesteps, dtype)
        return replace_steps(self.tau_value, steps)


@dataclass(frozen=True)
class PersonalizeSettings(_RFSettings):
    """Settings of `personalize`: `.paper()` (minidit's defaults, the paper's method) or `.official()` (the
    released code). See the module docstring and the README's "Presets" table."""
    perturb: bool = True               # patch perturbation (paper; not in the released code)

    @classmethod
    def paper(cls) -> "PersonalizeSettings":
        return cls()

    @classmethod
    def official(cls) -> "PersonalizeSettings":
        return cls(**_OFFICIAL_COMMON, concat=False, perturb=False)


@dataclass(frozen=True)
class EditSettings(_RFSettings):
    """Settings of `inpaint` and `outpaint` (`paste` is outpainting's only): `.paper()` / `.official()`."""
    tau: float = TAU_EDIT
    concat: bool = False
    blend: bool = True                 # latent blend in the preserved region at the replacement steps (minidit)
    paste: str = "fit"                 # outpainting canvas: "fit" (whole image on the canvas) or "clip"

    def __post_init__(self):
        super().__post_init__()
        check_choice("paste", self.paste, PASTES)

    @classmethod
    def paper(cls) -> "EditSettings":
        return cls()

    @classmethod
    def official(cls) -> "EditSettings":
        return cls(**_OFFICIAL_COMMON, concat=False, blend=False, paste="clip")


_OFFICIAL_COMMON = dict(
    tau=TAU_OFFICIAL, tau_units="percent", tau_time="shifted",   # gradio_demo.py tau slider 50, tau / 100;
                                                                 # attn_processor.py `timestep > self.tau`
    concat_steps="all",                # attn_processor.py: concept tokens every step, every item (when on)
    mask_rule="center",                # utils.py create_mask: NEAREST to the token grid, == 255
    inversion_grid="released",         # pipeline.py invert: t_i = i / len(sigmas), steps sigmas[i] - sigmas[i+1]
    invert_prompt="",                  # gradio_demo.py / notebooks: invert(source_prompt="", gamma=1.0)
    vae_sample=True)                   # pipeline.py encode_image: latent_dist.sample()


# --------------------------------------------------------------------------------------------- time and τ

def check_tau(tau: float) -> float:
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be in [0, 1] (a fraction of the normalised time; 0.8 = replace during the first "
                         f"20% of the steps), got {tau}")
    return float(tau)


def replace_steps(tau: float, steps: int) -> int:
    """How many early steps replace tokens: #{i : 1 - i/steps > τ} = ceil((1 - τ)·steps) (up to float noise)."""
    return max(0, math.ceil((1.0 - check_tau(tau)) * steps - 1e-9))


def replace_steps_shifted(tau: float, timesteps: Tensor, dtype: torch.dtype = torch.float32) -> int:
    """The released attn_processor's count: step i replaces iff `timestep > tau`, where the pipeline passes
    `timestep = (1000·t_i).to(latents dtype).item() / 1000` of the shifted sampler time t_i (src/pipeline.py)."""
    check_tau(tau)
    t = (timesteps[:-1].float() * 1000).to(dtype).double() / 1000
    return int((t > tau).sum())


def tau_threshold(tau: float, image_seq_len: int, shift: bool = True) -> float:
    """τ in the sampler's time: step i replaces iff its timestep t_i > τ_t = shift(τ) (identity for schnell)."""
    tau = check_tau(tau)
    if not shift or tau in (0.0, 1.0):
        return tau
    return float(sampling.time_shift(sampling.calculate_mu(image_seq_len), torch.tensor([tau]))[0])


def eta_window(start: float, stop: float, steps: int) -> tuple[int, int]:
    """Steps [i0, i1) on which the reference branch is controlled with η (the authors' start/stop_timestep)."""
    if not 0.0 <= start <= stop <= 1.0:
        raise ValueError(f"need 0 <= start <= stop <= 1, got start={start}, stop={stop}")
    return int(start * steps), min(int(stop * steps), steps)


# --------------------------------------------------------------------------------------------- inversion

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
    γ = 1 never calls the model (u would be multiplied by 0). Returns the latent at t = 1."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
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
    bar = sampling.Progress(n, progress, desc="invert")
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


def encode_reference(pipe, images: Tensor, sample: bool = False, seed: int = 0) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> packed latents (B, N, 64): the VAE posterior mean, or with `sample` one
    posterior sample per image drawn in order from `torch.Generator("cpu").manual_seed(seed)`."""
    if not sample:
        return pipe.encode_image(images)
    g = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad(), pipe._use(pipe.ae) as ae:
        return sampling.pack(ae.encode(images.to(pipe.device, pipe.dtype), sample=True, generator=g))


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
    return _invert_encoded(pipe, y0, prompt, timesteps, H, W, gamma, guidance, seed, progress, grid)


def _invert_encoded(pipe, y0, prompt, timesteps, H, W, gamma, guidance, seed, progress,
                    grid: str = "sampler") -> Inversion:
    noise = sampling.noise(1, H, W, seed, pipe.device, pipe.dtype)
    ids = sampling.image_ids(1, H, W, pipe.device)
    if gamma >= 1:  # the controller alone: no model call, no prompt needed
        xT = invert_latent(None, y0, ids, None, None, None, timesteps, noise, gamma, guidance, progress, grid)
    else:
        txt, txt_ids, vec = pipe.encode_prompt([prompt])
        with pipe._use(pipe.transformer) as model:
            xT = invert_latent(model, y0, ids, txt, txt_ids, vec, timesteps, noise, gamma, guidance, progress, grid)
    return Inversion(y0, xT, timesteps, H, W, prompt)


def reconstruct(pipe, inversion: Inversion, *, guidance: float = 3.5, eta: float = ETA, start: float = START,
                stop: float = STOP, progress: bool = False, return_latents: bool = False):
    """Re-trace the reference alone from its inverted latent (the reference branch without a target)."""
    txt, txt_ids, vec = pipe.encode_prompt([inversion.prompt])
    ids = sampling.image_ids(1, inversion.height, inversion.width, pipe.device)
    with pipe._use(pipe.transformer) as model:
        _, ref = denoise_with_references(model, inversion.noise, inversion.latent, inversion.latent[:0], ids, txt,
                                         txt_ids, vec, inversion.timesteps, guidance, [], n_replace=0, concat=False,
                                         eta=eta, start=start, stop=stop, keep_references=True, progress=progress)
    return ref if return_latents else pipe.decode(ref, inversion.height, inversion.width)


# --------------------------------------------------------------------------------------------- regions

@dataclass
class Region:
    """Reference token `src[k]` (its own grid) is written to target token `dst[k]`."""
    src: Tensor  # (K,) long
    dst: Tensor  # (K,) long
    mask_op: str = "none"   # the perturbation's mask augmentation: "dilate" | "erode" | "keep" | "none"


def plan_regions(masks: list[Tensor], offsets: list[tuple[int, int]], perturb: bool = False,
                 generator: torch.Generator | None = None, scene: Tensor | None = None) -> list[Region]:
    """Token masks (h, w) of the references + their translations (dy, dx) in tokens -> one Region per reference
    (then one for the scene, kept in place on its mask minus the subjects' regions).

    Errors on an empty mask, a subject moved off the canvas and overlapping target regions. With `perturb`, each
    subject mask is dilated or eroded (5x5) — never onto another subject's region or off the canvas — and its
    tokens shuffled inside 3x3 windows, all from `generator`."""
    if not masks:
        raise ValueError("need at least one reference")
    h, w = masks[0].shape
    targets = []
    for r, (m, (dy, dx)) in enumerate(zip(masks, offsets)):
        if m.shape != (h, w):
            raise ValueError(f"reference {r}'s token mask is {tuple(m.shape)}, expected {(h, w)}")
        require_nonempty(m, f"reference {r}'s subject mask")
        targets.append(translate(m, dy, dx))
    for a in range(len(targets)):
        for b in range(a + 1, len(targets)):
            if (targets[a] & targets[b]).any():
                raise ValueError(f"the target regions of references {a} and {b} overlap "
                                 f"({int((targets[a] & targets[b]).sum())} tokens): multi-subject regions must be "
                                 "disjoint; move one of them (placement) or shrink a mask")
    regions = []
    for r, (m, (dy, dx)) in enumerate(zip(masks, offsets)):
        op = "none"
        if perturb:
            if generator is None:
                raise ValueError("perturbation needs a seeded torch.Generator")
            aug, op = augment_mask(m, generator, MORPH_KERNEL)
            others = torch.zeros_like(m)
            for o, t in enumerate(targets):
                if o != r:
                    others |= t
            allowed = _shift_back(~others, dy, dx)          # sources whose target is on the canvas and free
            aug = aug & allowed
            m = aug if aug.any() else m
        src = token_indices(m)
        dst = src + dy * w + dx
        if perturb:
            src = local_shuffle(m, generator, SHUFFLE_WINDOW)[src]
        regions.append(Region(src, dst, op))
    if scene is not None:
        taken = torch.zeros(h * w, dtype=torch.bool)
        for reg in regions:
            taken[reg.dst] = True
        rest = scene.flatten() & ~taken
        if not rest.any():
            raise ValueError("the scene region is empty: the subjects cover all of the scene mask")
        idx = rest.nonzero().flatten()
        regions.append(Region(idx, idx.clone()))
    return regions


def _shift_back(allowed_dst: Tensor, dy: int, dx: int) -> Tensor:
    """Source tokens p whose translate(p, dy, dx) lands on the grid and on an allowed target token."""
    h, w = allowed_dst.shape
    out = torch.zeros_like(allowed_dst)
    r0, r1 = max(0, -dy), min(h, h - dy)
    c0, c1 = max(0, -dx), min(w, w - dx)
    if r0 < r1 and c0 < c1:
        out[r0:r1, c0:c1] = allowed_dst[r0 + dy:r1 + dy, c0 + dx:c1 + dx]
    return out


def _copy_tokens(x: Tensor, n: int, regions: list[Region]) -> Tensor:
    """Latent blend: every target's tokens at dst <- reference r's tokens at src."""
    x = x.clone()
    for r, reg in enumerate(regions):
        x[n:, reg.dst] = x[r:r + 1, reg.src]
    return x




# --------------------------------------------------------------------------------------------- the sampler

@torch.no_grad()
def denoise_with_references(model, x_ref: Tensor, y0: Tensor, img: Tensor, img_ids: Tensor, txt: Tensor,
                            txt_ids: Tensor, vec: Tensor, timesteps: Tensor, guidance: float | None,
                            regions: list[Region], *, n_replace: int, concat: bool = True, positions: str = "target",
                            eta: float = ETA, start: float = START, stop: float = STOP, blend: bool = False,
                            concat_steps: str = "late", decay_eta: bool = False, eta_decay_power: float = 1.0,
                            keep_references: bool = False, progress: bool = False,
                            trace: list | None = None) -> tuple[Tensor, Tensor | None]:
    """Euler sampling of the batch [references; targets].

    x_ref (n, N, 64) the references' inverted latents, y0 (n, N, 64) their clean latents, img (T, N, 64) the
    targets' noise; txt / txt_ids / vec for all n + T items (references first); img_ids (1, N, 3).
    Steps i < n_replace replace tokens (RefState.replace); later steps share the reference tokens as keys/values
    when `concat` — with concat_steps="all" at every step and for every item, references included (the released
    attn_processor's concept tokens). `blend` also sets the targets' latents in the regions to the references'
    at the replacement steps (editing). η is applied on steps [start·n, stop·n), times (1 - i/n)^eta_decay_power
    with `decay_eta` (src/pipeline.py). The references leave the batch once nothing reads them (unless
    `keep_references`). `trace` (tests): gets one dict per step (step, t, n_ref, replace, share, x = the step's
    input latents, layers = RefState's (layer, q, k, v) records). Returns (targets' latents (T, N, 64),
    references' latents or None).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    check_choice("concat_steps", concat_steps, CONCAT_STEPS)
    n, T, steps = x_ref.shape[0], img.shape[0], len(timesteps) - 1
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    early = late = None
    if regions:
        if len(regions) != n:
            raise ValueError(f"need one region per reference: {n} references, {len(regions)} regions")
        regions = [Region(reg.src.to(img.device), reg.dst.to(img.device), reg.mask_op) for reg in regions]
        src, dst = [reg.src for reg in regions], [reg.dst for reg in regions]
        every = concat and concat_steps == "all"
        early = RefState(n, src, dst, replace=True, share=every, positions=positions, share_refs=every)
        late = RefState(n, src, dst, share=True, positions=positions, share_refs=every) if concat else None
    elif n and (n_replace or concat or blend):
        raise ValueError("token replacement, concatenation and blending need one region per reference")
    i0, i1 = eta_window(start, stop, steps)
    last_ref_step = steps - 1 if (keep_references or concat) else n_replace - 1

    x = torch.cat([x_ref, img]).to(img.dtype)  # stored in the model dtype, updated in fp32 (as sampling.denoise)
    y0 = y0.float()
    ids = img_ids.expand(n + T, -1, -1) if img_ids.shape[0] == 1 else img_ids
    g = sampling.guidance_vector(model, n + T, guidance, img.device, img.dtype)
    bar = sampling.Progress(steps, progress, desc="personalize" if T else "reconstruct")
    for i, (t, t_next) in enumerate(zip(timesteps[:-1].tolist(), timesteps[1:].tolist())):
        if n and i > last_ref_step:  # nothing reads the references any more: they leave the batch
            x, ids, txt, txt_ids, vec = x[n:], ids[n:], txt[n:], txt_ids[n:], vec[n:]
            g = None if g is None else g[n:]
            n = 0
        state = (early if i < n_replace else late) if n else None
        if blend and n and i < n_replace:
            x = _copy_tokens(x, n, regions)
        if trace is not None:
            if state is not None:
                state.trace = []
            trace.append(dict(step=i, t=t, n_ref=n, replace=bool(state is not None and state.replace),
                              share=bool(state is not None and state.share), x=x.clone(),
                              layers=state.trace if state is not None else []))
        B = x.shape[0]
        pred = model(x, ids, txt, txt_ids, torch.full((B,), t, device=img.device, dtype=img.dtype), vec, g,
                     ref=state).float()
        e = eta if i0 <= i < i1 else 0.0
        if decay_eta:
            e = e * (1 - i / steps) ** eta_decay_power
        if n and e:  # the references follow the controlled reverse ODE towards their clean latents
            pred = torch.cat([pred[:n] + e * ((x[:n].float() - y0) / t - pred[:n]), pred[n:]])
        x = (x.float() + (t_next - t) * pred).to(img.dtype)
        if blend and n and i == n_replace - 1:  # the grid point t_{n_replace} is still on the reference trajectory
            x = _copy_tokens(x, n, regions)
        bar.update()
    for state in (early, late):
        if state is not None:
            state.trace = None
    return x[n:], (x[:n] if n else None)


# --------------------------------------------------------------------------------------------- inputs

def _offset(placement, tokens: Tensor, r: int) -> tuple[int, int]:
    """None -> (0, 0); (dx, dy) pixel offset; (x, y, w, h) pixel target box -> (dy, dx) in tokens."""
    if placement is None:
        return 0, 0
    p = tuple(placement)
    if len(p) == 2:
        return pixels_to_tokens(p[1], f"reference {r}'s y offset"), pixels_to_tokens(p[0], f"reference {r}'s x offset")
    if len(p) == 4:
        return box_offset(tokens, p)
    raise ValueError(f"placement of reference {r} must be None, an offset (dx, dy) or a target box (x, y, w, h) in "
                     f"pixels, got {placement}")


def outpaint_canvas(image: Tensor, canvas: tuple[int, int], offset: tuple[int, int] | None = None,
                    paste: str = "fit") -> tuple[Tensor, Tensor]:
    """(3, h, w) image -> (the (3, H, W) black canvas with the image pasted at offset (x, y), the (H, W) pixel mask
    of the pasted area). Default offset: centred, rounded down to 16 px. paste="fit": the whole image must lie
    on the canvas; "clip" (gradio_demo.py `predict_outpainting_mask`): any offset, what leaves the canvas is
    cropped (error if nothing is left)."""
    check_choice("paste", paste, PASTES)
    h, w = image.shape[1:]
    if len(canvas) != 2:
        raise ValueError(f"canvas must be (width, height) in pixels, got {canvas!r}")
    H, W = validate.image_size(canvas[1], canvas[0], what="canvas ")  # the canvas; the image may have any size
    if offset is None:
        offset = ((W - w) // 2 // PATCH * PATCH, (H - h) // 2 // PATCH * PATCH)
    if len(offset) != 2:
        raise ValueError(f"offset must be (x, y) in pixels, got {offset!r}")
    ox, oy = (validate.integer(f"offset {name}", v) for name, v in zip("xy", offset))
    if paste == "fit" and (ox < 0 or oy < 0 or ox + w > W or oy + h > H):
        raise ValueError(f"the {w}x{h} image at offset ({ox}, {oy}) does not fit on the {W}x{H} canvas")
    x0, y0, x1, y1 = max(ox, 0), max(oy, 0), min(ox + w, W), min(oy + h, H)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"the {w}x{h} image at offset ({ox}, {oy}) lies entirely off the {W}x{H} canvas")
    full = torch.full((3, H, W), -1.0)  # black, as their Image.new("RGB", ..., (0, 0, 0))
    full[:, y0:y1, x0:x1] = image[:, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    area = torch.zeros(H, W)
    area[y0:y1, x0:x1] = 1.0
    return full, area


# --------------------------------------------------------------------------------------------- entry points

def personalize(pipe, prompt: str, reference: Reference | list[Reference], *, placement=None,
                scene: Reference | None = None, height: int | None = None, width: int | None = None,
                steps: int | None = None, guidance: float = 3.5, seed: int = 0, num_images: int = 1,
                preset: str | PersonalizeSettings = "paper",
                tau: float = PRESET, tau_units: str = PRESET, tau_time: str = PRESET, perturb: bool = PRESET,
                concat: bool = PRESET, concat_steps: str = PRESET, positions: str = PRESET, mask_rule: str = PRESET,
                inversion_grid: str = PRESET, gamma: float = PRESET, invert_guidance: float = PRESET,
                invert_prompt: str | None = PRESET, eta: float = PRESET, start: float = PRESET,
                stop: float = PRESET, decay_eta: bool = PRESET, eta_decay_power: float = PRESET,
                vae_sample: bool = PRESET, vae_seed: int | None = PRESET,
                progress: bool = False, return_latents: bool = False, trace: list | None = None):
    """Generate `prompt` with the subject(s) of `reference` (one Reference or a list: multi-subject) placed by
    `placement` (None = where it is, (dx, dy) pixel offset, (x, y, w, h) target box; a list for several
    references) and optionally a `scene` reference filling the rest. Returns `num_images` PIL images.
    Reference i is inverted with ε = sampling.noise(1, H, W, seed + 1 + i); the targets' noise is
    `sampling.noise(num_images, H, W, seed)` (what `generate` uses).

    preset: "paper" (default) or "official" (the released code) or a PersonalizeSettings; every keyword from
    `tau` to `vae_seed` left at PRESET takes the preset's value, any other value overrides just that field
    (`PersonalizeSettings.resolve(preset, ...)` gives the resolved settings). See the module docstring."""
    s = PersonalizeSettings.resolve(
        preset, tau=tau, tau_units=tau_units, tau_time=tau_time, perturb=perturb, concat=concat,
        concat_steps=concat_steps, positions=positions, mask_rule=mask_rule, inversion_grid=inversion_grid,
        gamma=gamma, invert_guidance=invert_guidance, invert_prompt=invert_prompt, eta=eta, start=start, stop=stop,
        decay_eta=decay_eta, eta_decay_power=eta_decay_power, vae_sample=vae_sample, vae_seed=vae_seed)
    validate.generate_args(height, width, steps, guidance, seed, num_images)
    refs = [reference] if isinstance(reference, Reference) else list(reference)
    if not refs:
        raise ValueError("need at least one Reference")
    if placement is None:
        placement = [None] * len(refs)
    elif not _is_list_of_placements(placement):
        if len(refs) != 1:
            raise ValueError(f"give one placement per reference as a list ({len(refs)} references)")
        placement = [placement]
    if len(placement) != len(refs):
        raise ValueError(f"got {len(placement)} placements for {len(refs)} references (give one per reference)")

    images, masks = [], []
    for r, ref in enumerate(refs):
        x, m = load_reference(ref, height, width, f"reference {r}")
        height, width = x.shape[1:]
        images.append(x), masks.append(m)
    tokens = [token_mask_rule(m, s.mask_rule) for m in masks]
    for r, tk in enumerate(tokens):
        require_nonempty(tk, f"reference {r}'s subject mask")
    offsets = [_offset(p, tk, r) for r, (p, tk) in enumerate(zip(placement, tokens))]
    scene_tokens = None
    if scene is not None:
        xs, ms = load_reference(scene, height, width, "the scene")
        images.append(xs)
        scene_tokens = require_nonempty(token_mask_rule(ms, s.mask_rule), "the scene mask")
        refs = refs + [scene]
    regions = plan_regions(tokens, offsets, s.perturb, torch.Generator().manual_seed(seed), scene_tokens)
    latents = _run(pipe, prompt, images, [r.prompt or "" for r in refs], regions, height, width, s, steps=steps,
                   guidance=guidance, seed=seed, num_images=num_images, blend=False, progress=progress, trace=trace)
    return latents if return_latents else pipe.decode(latents, height, width)


def _is_list_of_placements(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(q is None or isinstance(q, (list, tuple)) for q in p)


def inpaint(pipe, image, mask, prompt: str, *, steps: int | None = None, guidance: float = 3.5, seed: int = 0,
            num_images: int = 1, image_prompt: str = "", preset: str | EditSettings = "paper",
            tau: float = PRESET, tau_units: str = PRESET, tau_time: str = PRESET, blend: bool = PRESET,
            concat: bool = PRESET, concat_steps: str = PRESET, positions: str = PRESET, mask_rule: str = PRESET,
            inversion_grid: str = PRESET, gamma: float = PRESET, invert_guidance: float = PRESET,
            invert_prompt: str | None = PRESET, eta: float = PRESET, start: float = PRESET, stop: float = PRESET,
            decay_eta: bool = PRESET, eta_decay_power: float = PRESET, vae_sample: bool = PRESET,
            vae_seed: int | None = PRESET, paste: str = PRESET,
            progress: bool = False, return_latents: bool = False, trace: list | None = None):
    """Repaint the white region of `mask` (path / PIL / (H, W) tensor / (x, y, w, h) box, at the image's size)
    following `prompt`; everything else is preserved (the reference, no perturbation). image_prompt: the prompt
    of the reference branch (the authors' demo: ""). preset / keywords: as `personalize`, with EditSettings
    ("paper": τ = 0.1 step fraction, blend on; "official": the released gradio demo, no blend). `paste` is
    outpainting's and does nothing here."""
    s = EditSettings.resolve(
        preset, tau=tau, tau_units=tau_units, tau_time=tau_time, blend=blend, concat=concat,
        concat_steps=concat_steps, positions=positions, mask_rule=mask_rule, inversion_grid=inversion_grid,
        gamma=gamma, invert_guidance=invert_guidance, invert_prompt=invert_prompt, eta=eta, start=start, stop=stop,
        decay_eta=decay_eta, eta_decay_power=eta_decay_power, vae_sample=vae_sample, vae_seed=vae_seed, paste=paste)
    validate.generate_args(None, None, steps, guidance, seed, num_images)
    x = image_tensor(image)
    H, W = x.shape[1:]
    resize_image(x, H, W)  # checks the size
    edit = pixel_mask(mask, H, W, "edit mask")
    if not (edit > 0).any():
        raise ValueError("the edit mask is empty: nothing to repaint (white = the region to repaint)")
    return _edit(pipe, x, keep_tokens(1 - edit, s.mask_rule), prompt, s, steps=steps, guidance=guidance, seed=seed,
                 num_images=num_images, image_prompt=image_prompt, progress=progress,
                 return_latents=return_latents, trace=trace)


def keep_tokens(preserved: Tensor, rule: str = "area") -> Tensor:
    """(H, W) preserved-pixel mask (1 = keep) -> the preserved tokens: "area" keeps a token whose whole 16x16
    patch is preserved; "center" one whose centre pixel (16·r + 8, 16·c + 8) is (the released create_mask)."""
    return token_mask(preserved, threshold=1.0) if rule == "area" else token_mask_rule(preserved, rule)


def outpaint(pipe, image, prompt: str, canvas: tuple[int, int], *, offset: tuple[int, int] | None = None,
             steps: int | None = None, guidance: float = 3.5, seed: int = 0, num_images: int = 1,
             image_prompt: str = "", preset: str | EditSettings = "paper",
             tau: float = PRESET, tau_units: str = PRESET, tau_time: str = PRESET, blend: bool = PRESET,
             concat: bool = PRESET, concat_steps: str = PRESET, positions: str = PRESET, mask_rule: str = PRESET,
             inversion_grid: str = PRESET, gamma: float = PRESET, invert_guidance: float = PRESET,
             invert_prompt: str | None = PRESET, eta: float = PRESET, start: float = PRESET, stop: float = PRESET,
             decay_eta: bool = PRESET, eta_decay_power: float = PRESET, vae_sample: bool = PRESET,
             vae_seed: int | None = PRESET, paste: str = PRESET,
             progress: bool = False, return_latents: bool = False, trace: list | None = None):
    """Extend `image` to a canvas of (W, H) pixels: the image is pasted at `offset` (x, y) of its top-left corner
    (default: centred, rounded down to 16 px) on a black canvas (`outpaint_canvas`); its area is preserved, the
    rest generated. preset / keywords: as `inpaint`."""
    s = EditSettings.resolve(
        preset, tau=tau, tau_units=tau_units, tau_time=tau_time, blend=blend, concat=concat,
        concat_steps=concat_steps, positions=positions, mask_rule=mask_rule, inversion_grid=inversion_grid,
        gamma=gamma, invert_guidance=invert_guidance, invert_prompt=invert_prompt, eta=eta, start=start, stop=stop,
        decay_eta=decay_eta, eta_decay_power=eta_decay_power, vae_sample=vae_sample, vae_seed=vae_seed, paste=paste)
    validate.generate_args(None, None, steps, guidance, seed, num_images)
    full, area = outpaint_canvas(image_tensor(image), canvas, offset, s.paste)
    return _edit(pipe, full, keep_tokens(area, s.mask_rule), prompt, s, steps=steps, guidance=guidance, seed=seed,
                 num_images=num_images, image_prompt=image_prompt, progress=progress,
                 return_latents=return_latents, trace=trace)


def _edit(pipe, x: Tensor, keep: Tensor, prompt: str, s: EditSettings, *, return_latents: bool, image_prompt: str,
          **kw):
    if not keep.any():
        raise ValueError("nothing is preserved: no 16x16 token lies entirely outside the edit region "
                         "(use generate for a new image)")
    if keep.all():
        raise ValueError("nothing to generate: every token is preserved")
    H, W = x.shape[1:]
    idx = token_indices(keep)
    latents = _run(pipe, prompt, [x], [image_prompt], [Region(idx, idx.clone())], H, W, s, blend=s.blend, **kw)
    return latents if return_latents else pipe.decode(latents, H, W)


def _run(pipe, prompt: str, images: list[Tensor], ref_prompts: list[str], regions: list[Region], H: int, W: int,
         s: _RFSettings, *, steps, guidance, seed, num_images, blend, progress, trace):
    """Invert the references, then sample the batch [references; targets] -> the targets' packed latents."""
    timesteps = pipe.schedule(steps, H, W)
    n_replace = s.replace_steps(timesteps, pipe.dtype)
    needed = n_replace > 0 or s.concat
    if needed:
        y0 = encode_reference(pipe, torch.stack(images), s.vae_sample, seed if s.vae_seed is None else s.vae_seed)
        inv = [_invert_encoded(pipe, y0[r:r + 1], ref_prompts[r] if s.invert_prompt is None else s.invert_prompt,
                               timesteps, H, W, s.gamma, s.invert_guidance, seed + 1 + r, progress, s.inversion_grid)
               for r in range(len(images))]
        x_ref = torch.cat([i.noise for i in inv])
    else:  # τ = 1 and no later-stage tokens: the references would never be read
        ref_prompts, regions = [], []
        x_ref = y0 = torch.zeros(0, (H // 16) * (W // 16), 64, device=pipe.device, dtype=pipe.dtype)
    txt, txt_ids, vec = pipe.encode_prompt(list(ref_prompts) + [prompt] * num_images)
    img = sampling.noise(num_images, H, W, seed, pipe.device, pipe.dtype)
    with pipe._use(pipe.transformer) as model:
        out, _ = denoise_with_references(
            model, x_ref, y0, img, sampling.image_ids(1, H, W, pipe.device), txt, txt_ids, vec, timesteps, guidance,
            regions, n_replace=n_replace if needed else 0, concat=s.concat, positions=s.positions, eta=s.eta,
            start=s.start, stop=s.stop, blend=blend, concat_steps=s.concat_steps, decay_eta=s.decay_eta,
            eta_decay_power=s.eta_decay_power, progress=progress, trace=trace)
    return out
