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
   patch) and *inverted* (inversion.py): a controlled rectified-flow ODE from t = 0 (image) to t = 1 (noise)
   pulls it onto one seeded noise sample ε; with γ = 1 (the authors' value) the inverted latent is exactly ε.
2. Generation runs ONE batch  [ref_0, ..., ref_{n-1}, target_0, ...]  through `sampling.denoise`, whose branch
   is a `ReferenceTrajectory` (trajectory.py): the reference items start from their inverted latents and
   *re-trace* their image with the controlled reverse ODE  v̂ = v + η (v_cond - v),  v_cond = (x - y0) / t  (RF-Inversion Alg. 2). With
   η = 1 (steps start·n <= i < stop·n, the authors' 0 and 0.99) the reference stays on the path
   x_t = (1 - t)·y0 + t·ε, so at every step and every layer its tokens are the reference image's tokens at the
   current noise level, computed by the same network as the target: nothing is stored, the reference is simply
   one more batch item. `decay_eta` multiplies η by (1 - i/n)^eta_decay_power (the released pipeline's option).
   (With a `cache=` (refcache.py) the references run in a forward pass of their own before the targets' and
   what the targets read is kept, so other prompts of the same reference read it instead of recomputing it.)
3. Pick a subject token at (row, col) of the reference's token grid; its flat index p = row·w + col is in `src`.
   Layout control moves it to p' = p + dy·w + dx in the target (`dst`, regions.py): a translation by an offset,
   or the one that centres the subject in a target box. Patch perturbation (personalization only) first dilates
   or erodes the subject mask (5x5) and shuffles which subject token goes where inside 3x3 windows, drawn once
   per image from `seed`. (The paper's perturbation is not in the released code: "official" has perturb=False.)
4. Early steps, t > τ (token replacement): in every double and single block, after the row-wise q/k/v projection
   and QK-norm (so exactly "before the projections", refstate.RefState.replace_tokens), the target's q, k and v
   rows at p' are overwritten by the reference's rows at p. RoPE is applied afterwards with the target's own
   position ids, so the token sits at its new place; the target's residual stream and MLP are untouched.
   (src/attn_processor.py overwrites the attention's input hidden states before to_q/to_k/to_v: the same rows.)
5. Later steps, t <= τ (multi-modal attention): no replacement; instead the reference subject tokens join the
   target's joint attention as extra keys/values (`concat=True`), rotated at the target region's positions
   (`positions="target"`, the authors' code) or left unrotated, i.e. at position (0, 0, 0) (`positions="zero"`,
   the paper). The authors also append them as queries whose outputs are dropped; a dropped query changes no
   other output, so minidit does not compute them. The paper (`concat_steps="late"`): only after τ and only for
   the targets. The released code (`concat_steps="all"`, its `concept_process=True`, off in every released
   demo): at every step and for every batch item, the reference items attending to them too.
6. Each Euler step moves every item; the references leave the batch once nothing reads them any more.

τ and time. Step i of `steps` runs at t_i = shift(1 - i/steps). `tau_time="steps"` (the paper's "τ = 0.8T",
minidit's default): a step replaces while 1 - i/steps > τ, i.e. the first ceil((1 - τ)·steps) steps
(`replace_steps`): τ = 0.8 the first 20 %, τ = 1 never, τ = 0 always; editing uses τ = 0.1. `tau_time="shifted"`
(src/attn_processor.py `timestep > self.tau`, the shifted scheduler time in the latents' dtype): a step replaces
while the shifted t_i > τ (`replace_steps_shifted`). `tau_units="percent"`: the demo's slider 0..100.

Editing (inpaint / outpaint): the preserved region is the reference (in place, no perturbation, no later-stage
tokens, as the authors' demo). `blend` (minidit's deviation, on in "paper", off in "official"): at the
replacement steps the target's latent in the preserved region is set to the reference trajectory too, since
replacement alone leaves the target's residual stream there on its own noise. Outpainting pastes the image on a
black canvas (gradio_demo.py): `paste="clip"` (theirs) crops what leaves it, `paste="fit"` refuses that.

Multi-subject: one reference branch per subject, each into its own (disjoint) target region; `scene=` is one
more reference kept in place on its mask minus the subjects' regions. Masks: white = subject at the reference's
size, or an (x, y, w, h) box; `mask_rule` "area" (minidit: half of the 16x16 patch) or "center" (src/utils.py
`create_mask`: the patch's centre pixel is exactly white). minidit ships no segmenter (SAM, rembg, BiRefNet).

Presets: `PersonalizeSettings` (personalize), `EditSettings` (inpaint, outpaint). "official" is the released code
(github.com/fenghora/personalize-anything: src/pipeline.py, attn_processor.py, utils.py, gradio_demo.py): 28
steps, guidance 3.5, inversion with an empty prompt and γ = 1 on their grid, η = 1 on steps [0, 0.99·n), τ = 50 %
on the shifted time, no perturbation or concept tokens, centre-pixel masks, no blend, the VAE posterior sampled
(`vae_seed`). What it cannot reproduce, and release-parity numbers: docs/methods.md.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from . import sampling, validate
from .defaults import CONCAT_POSITIONS, TAU, TAU_EDIT  # 0.8, 0.1; ("target", "zero"): RoPE of late reference keys
from .inversion import GAMMA, INVERSION_GRIDS, INVERT_GUIDANCE, Inversion, invert_encoded
from .masks import (Reference, image_tensor, load_reference, pixel_mask, require_nonempty, resize_image,
                    token_indices, token_mask_rule)
from .presets import Settings, check_choice, document_settings
from .refcache import ReferenceCache
from .regions import PASTES, Region, keep_tokens, outpaint_canvas, placement_offset, plan_regions
from .trajectory import ReferenceTrajectory

TAU_OFFICIAL = 50.0   # gradio_demo.py: the Tau slider's default, in percent, compared with the shifted time
ETA = 1.0             # RF-Inversion controller strength (reference branch during generation)
START, STOP = 0.0, 0.99
TAU_UNITS = ("fraction", "percent")
TAU_TIMES = ("steps", "shifted")
CONCAT_STEPS = ("late", "all")
PA_MASK_RULES = ("area", "center")


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
        check_choice("positions", self.positions, CONCAT_POSITIONS)
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


# --------------------------------------------------------------------------------------------- the branch

def reconstruct(pipe, inversion: Inversion, *, guidance: float = 3.5, eta: float = ETA, start: float = START,
                stop: float = STOP, progress: bool = False, return_latents: bool = False):
    """Re-trace the reference alone from its inverted latent (the reference branch without a target)."""
    txt, txt_ids, vec = pipe.encode_prompt([inversion.prompt])
    H, W, ts = inversion.height, inversion.width, inversion.timesteps
    branch = ReferenceTrajectory(inversion.noise, inversion.latent, sampling.image_ids(1, H, W, pipe.device), txt,
                                 txt_ids, vec, [], len(ts) - 1, PersonalizeSettings(concat=False, eta=eta,
                                                                                    start=start, stop=stop),
                                 n_replace=0, keep=True)
    empty = inversion.latent[:0]
    with pipe.use(pipe.transformer) as model:
        sampling.denoise(model, empty, sampling.image_ids(0, H, W, pipe.device), txt[:0], txt_ids[:0], vec[:0], ts,
                         guidance, progress, branch=branch, desc="reconstruct")
    return branch.x if return_latents else pipe.decode(branch.x, H, W)


# --------------------------------------------------------------------------------------------- entry points

@document_settings(PersonalizeSettings)
def personalize(pipe, prompt: str, reference: Reference | list[Reference], *, placement=None,
                scene: Reference | None = None, height: int | None = None, width: int | None = None,
                steps: int | None = None, guidance: float | None = None, seed: int = 0, num_images: int = 1,
                preset: str | PersonalizeSettings = "paper", progress: bool = False, return_latents: bool = False,
                trace: list | None = None, cache: ReferenceCache | None = None, **settings):
    """Generate `prompt` with the subject(s) of `reference` (one Reference or a list: multi-subject) placed by
    `placement` (None = where it is, (dx, dy) pixel offset, (x, y, w, h) target box; a list for several
    references) and optionally a `scene` reference filling the rest. Returns `num_images` PIL images.
    Reference i is inverted with ε = sampling.noise(1, H, W, seed + 1 + i); the targets' noise is
    `sampling.noise(num_images, H, W, seed)` (what `generate` uses). None = the model's (pipe.defaults).
    preset: "paper" (default), "official" (the released code) or a PersonalizeSettings; any field below given as
    a keyword overrides just that field (`PersonalizeSettings.resolve(preset, **settings)`).
    cache: a refcache.ReferenceCache shared by calls with the same reference (e.g. many prompts): the reference
    branch is computed once and read again, bit-identically (see refcache.py)."""
    s = PersonalizeSettings.resolve(preset, **settings)
    height, width, guidance = pipe.with_defaults(height, width, guidance, image_input=True)[:3]
    validate.generate_args(height, width, steps, guidance, seed, num_images)
    refs = [reference] if isinstance(reference, Reference) else list(reference)
    if not refs:
        raise ValueError("need at least one Reference")
    if placement is None:
        placement = [None] * len(refs)
    elif not is_placement_list(placement):
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
    offsets = [placement_offset(p, tk, r) for r, (p, tk) in enumerate(zip(placement, tokens))]
    scene_tokens = None
    if scene is not None:
        xs, ms = load_reference(scene, height, width, "the scene")
        images.append(xs)
        scene_tokens = require_nonempty(token_mask_rule(ms, s.mask_rule), "the scene mask")
        refs = refs + [scene]
    regions = plan_regions(tokens, offsets, s.perturb, torch.Generator().manual_seed(seed), scene_tokens)
    latents = sample_with_references(pipe, prompt, images, [r.prompt or "" for r in refs], regions, height, width,
                                     s, steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                                     blend=False, progress=progress, trace=trace, cache=cache)
    return latents if return_latents else pipe.decode(latents, height, width)


def is_placement_list(p) -> bool:
    """A list of placements (one per reference), as opposed to one placement (a tuple of numbers)."""
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(q is None or isinstance(q, (list, tuple)) for q in p)


@document_settings(EditSettings)
def inpaint(pipe, image, mask, prompt: str, *, steps: int | None = None, guidance: float | None = None, seed: int = 0,
            num_images: int = 1, image_prompt: str = "", preset: str | EditSettings = "paper",
            progress: bool = False, return_latents: bool = False, trace: list | None = None, **settings):
    """Repaint the white region of `mask` (path / PIL / (H, W) tensor / (x, y, w, h) box, at the image's size)
    following `prompt`; everything else is preserved (the reference, no perturbation). image_prompt: the prompt
    of the reference branch (the authors' demo: ""). preset / keywords: as `personalize`, with EditSettings
    ("paper": τ = 0.1 step fraction, blend on; "official": the released gradio demo, no blend). `paste` is
    outpainting's and does nothing here. The image's size is the output's; None = the model's value."""
    s = EditSettings.resolve(preset, **settings)
    guidance = pipe.with_defaults(guidance=guidance)[2]
    validate.generate_args(None, None, steps, guidance, seed, num_images)
    x = image_tensor(image)
    H, W = x.shape[1:]
    resize_image(x, H, W)  # checks the size
    edit = pixel_mask(mask, H, W, "edit mask")
    if not (edit > 0).any():
        raise ValueError("the edit mask is empty: nothing to repaint (white = the region to repaint)")
    return edit_region(pipe, x, keep_tokens(1 - edit, s.mask_rule), prompt, s, steps=steps, guidance=guidance,
                       seed=seed, num_images=num_images, image_prompt=image_prompt, progress=progress,
                       return_latents=return_latents, trace=trace)


@document_settings(EditSettings)
def outpaint(pipe, image, prompt: str, canvas: tuple[int, int], *, offset: tuple[int, int] | None = None,
             steps: int | None = None, guidance: float | None = None, seed: int = 0, num_images: int = 1,
             image_prompt: str = "", preset: str | EditSettings = "paper", progress: bool = False,
             return_latents: bool = False, trace: list | None = None, **settings):
    """Extend `image` to a canvas of (W, H) pixels (CLI: --width --height) pasted at `offset` (x, y) (--offset) of
    its top-left corner (default: centred, rounded down to 16 px) on a black canvas (`regions.outpaint_canvas`);
    its area is preserved, the rest generated. preset / keywords: as `inpaint`."""
    s = EditSettings.resolve(preset, **settings)
    guidance = pipe.with_defaults(guidance=guidance)[2]
    validate.generate_args(None, None, steps, guidance, seed, num_images)
    full, area = outpaint_canvas(image_tensor(image), canvas, offset, s.paste)
    return edit_region(pipe, full, keep_tokens(area, s.mask_rule), prompt, s, steps=steps, guidance=guidance,
                       seed=seed, num_images=num_images, image_prompt=image_prompt, progress=progress,
                       return_latents=return_latents, trace=trace)


def edit_region(pipe, x: Tensor, keep: Tensor, prompt: str, s: EditSettings, *, return_latents: bool,
                image_prompt: str, **kw):
    """Inpainting and outpainting: generate around the kept tokens of image x (3, H, W), which stay in place."""
    if not keep.any():
        raise ValueError("nothing is preserved: no 16x16 token lies entirely outside the edit region "
                         "(use generate for a new image)")
    if keep.all():
        raise ValueError("nothing to generate: every token is preserved")
    H, W = x.shape[1:]
    idx = token_indices(keep)
    latents = sample_with_references(pipe, prompt, [x], [image_prompt], [Region(idx, idx.clone())], H, W, s,
                                     blend=s.blend, **kw)
    return latents if return_latents else pipe.decode(latents, H, W)


def sample_with_references(pipe, prompt: str, images: list[Tensor], ref_prompts: list[str], regions: list[Region],
                           H: int, W: int, s: _RFSettings, *, steps, guidance, seed, num_images, blend, progress,
                           trace, cache: ReferenceCache | None = None) -> Tensor:
    """Invert the references, then sample the batch [references; targets] -> the targets' packed latents (with a
    `cache`: the references' own passes, kept under a fingerprint of every input of their branch)."""
    timesteps = pipe.schedule(steps, H, W)
    n_replace = s.replace_steps(timesteps, pipe.dtype)
    if not (n_replace > 0 or s.concat):  # τ = 1 and no later-stage tokens: the references would never be read
        images, ref_prompts, regions = [], [], []
    n = len(images)
    if n:
        y0 = pipe.encode_reference(torch.stack(images), s.vae_sample, seed if s.vae_seed is None else s.vae_seed)
        inv = [invert_encoded(pipe, y0[r:r + 1], ref_prompts[r] if s.invert_prompt is None else s.invert_prompt,
                              timesteps, H, W, gamma=s.gamma, guidance=s.invert_guidance, seed=seed + 1 + r,
                              grid=s.inversion_grid, progress=progress) for r in range(n)]
        x_ref = torch.cat([i.noise for i in inv])
    else:
        x_ref = y0 = torch.zeros(0, (H // 16) * (W // 16), 64, device=pipe.device, dtype=pipe.dtype)
    txt, txt_ids, vec = pipe.encode_prompt(list(ref_prompts) + [prompt] * num_images)
    ids = sampling.image_ids(n, H, W, pipe.device)
    n_replace = n_replace if n else 0
    kept = None if cache is None else cache.entry(
        "personalize", id(pipe.transformer), str(pipe.dtype), x_ref, y0, ids, txt[:n], txt_ids[:n], vec[:n],
        [(r.src, r.dst, r.mask_op) for r in regions], timesteps, guidance, n_replace, blend, repr(s))
    branch = ReferenceTrajectory(x_ref, y0, ids, txt[:n], txt_ids[:n], vec[:n], regions, len(timesteps) - 1, s,
                                 n_replace=n_replace, blend=blend, trace=trace, kept=kept)
    img = sampling.noise(num_images, H, W, seed, pipe.device, pipe.dtype)
    with pipe.use(pipe.transformer) as model:
        return sampling.denoise(model, img, sampling.image_ids(num_images, H, W, pipe.device), txt[n:], txt_ids[n:],
                                vec[n:], timesteps, guidance, progress, branch=branch, desc="personalize")
