"""FreeCus (Zhang et al., ICCV 2025): training-free subject customization by pivotal attention sharing.

    images = pipe.freecus("a corgi surfing a wave", Reference("corgi.png", mask="corgi_mask.png"),
                          caption="a corgi with a fluffy orange-white coat and large upright ears")

The method in one denoising step i (target time t_i, reference noise level σ'_i, see `reference_sigmas`):

1. No inversion. The clean reference latent x_ref is noised directly to   z_i = (1 - σ'_i)·x_ref + σ'_i·ε
   with one seeded ε, fixed for the whole run (`noised_reference`).
2. One forward pass over the batch [z_i; target_0 .. target_{B-1}], driven by a `RefState` (refstate.py) that
   says: item 0 is a reference (n_ref=1), its subject tokens are `src` (the token mask of the reference),
   share its keys/values on the *vital layers* (`layers`), at its own positions (`positions="own"`), and the
   reference may leave the batch after the last vital layer (`last_layer`).
3. Follow a reference key into the target's attention on a vital layer l (transformer.py `joint_attention`):
   every block projects q, k, v for the whole batch as usual; `RefState.reference_kv` takes batch item 0's
   image-token keys, rotates them with item 0's own RoPE (the reference has the same grid as the target, so a
   subject token at (row, col) keeps position (row, col)) and pairs them with the subject mask. The target then
   attends over three key segments,

        K' = [λ_r·K_ref (subject tokens only);  λ_p·K_txt;  K_img]      V' = [V_ref (subject);  V_txt;  V_img]

   i.e. logit_j = s_j·(q·k_j)/√D with s = λ_r / λ_p / 1, and masked-out (background) reference tokens get no
   weight at all ("exclude", what the authors' code does by gathering the subject indices). The reference
   item itself attends normally. On every other layer the target attends normally; λ only acts on vital layers.
4. The model returns the targets' velocities only; an Euler step moves the targets; the reference's output is
   dropped (it is re-noised from x_ref at the next step, so it has no trajectory of its own).

Facts taken from the authors' code (github.com/Monalissaa/FreeCus: infer.py, sa_handler_for_flux_clean.py,
flux_utils.py, qwen_for_subject.py, seg_birefnet.py):
- vital layers [0, 1, 2, 17, 18, 25, 28, 53, 54, 56], counted over the 19 double then 38 single blocks (the
  order of diffusers' `attn_processors`). For a model of another depth, `default_vital_layers` maps each index
  to the same relative place within its own block type (exact for FLUX.1; tiny 2+2 model: all four layers).
- λ: the "save" pass stores `scale · K_ref` with `Handler.register`'s default scale 1.1 (λ_r = 1.1) and the
  "use" pass multiplies the 512 text keys by `--extend_scale` (default 1.1, λ_p = 1.1), on vital layers only.
  A quirk of their code: infer.py registers the save pass without `scale=`, so λ_r is 1.1 whatever
  `--extend_scale` is; only λ_p follows it. Here both are separate settings (`lambda_ref`, `lambda_prompt`),
  1.1 in both presets, so changing `lambda_prompt` alone is exactly their `--extend_scale`.
- 30 steps, guidance 3.5, 512x512, seed 777, max_sequence_length 512 (FLUX.1-dev).
- ANS: the reference latents are `scheduler.scale_noise(x_ref, t, ε)` over the schedule built from
  sigmas = linspace(1, 1/n, n) with mu = -calculate_shift(seq_len) ("negative", the default `--mu_shift_type`):
  σ'_i = e^{-μ} / (e^{-μ} + (1/s_i - 1)), s_i = 1 - i/n. The other `--mu_shift_type`s (flux_utils.py):
  "half_negative" (-μ/2), "twice_negative" (-2μ), "normal" (+μ: the ordinary dynamic shift, no reversal) and
  "linear" (no shift: σ'_i = floor(1000·s_i)/1000, looked up in a 1000-step linear table); minidit adds
  "target" (the target's own σ, whatever its schedule: no ANS). One discrepancy: the released
  `flux_utils.pil_to_latents_flux` computes `image_seq_len` from the *latent* size (`released_ans_seq_len`: 16
  at 512², not 1024; the resulting μ: docs/methods.md). minidit's "paper" preset uses μ of the real image token
  count (`mu_from="tokens"`), "official" the released one (`mu_from="latent"`); `ans_mu` overrides μ directly.
  The reference is still *run at the target's timestep t_i*: the noised latents are swapped into a normal pipeline call (callback_on_step_end), whose time
  embedding follows the normal schedule. `ref_time="sigma"` tells the model σ'_i instead.
  ε: `randn` from `Generator("cpu").manual_seed(seed)` with the same seed as the target, i.e. the target's own
  initial noise; here ε = `sampling.noise(1, H, W, seed)` (same seed default).
- The reference prompt is the target's full prompt (prompt + caption): both passes get the same `prompt`.
- Subject tokens: a BiRefNet mask at the target size, bilinearly downsampled to (H/16, W/16), tokens with value
  > 0 kept (`mask_rule="bilinear"`, "official"). minidit takes any mask the user brings; "paper" uses
  `masks.token_mask` (`mask_rule="area"`: a token is subject when >= 50% of its 16x16 patch is): the same
  tokens inside the subject, slightly fewer on its border.
- The reference image is resized to the target size; the VAE latent is sampled from torch's global CUDA
  generator (`retrieve_latents(..., generator=None)`). "official" samples it too (`vae_sample=True`, from a
  seeded CPU generator `vae_seed`, default the run's seed), "paper" takes the posterior mean.

Presets (`preset="paper"` default | `"official"`, `FreeCusSettings.paper()` / `.official()`, the README's
table): they differ in `mu_from`, `mask_rule` and `vae_sample`; every field can be overridden by its own
keyword. What "official" still cannot reproduce: the VAE sample of their code comes from the global CUDA
generator (not seedable from their arguments; pass `vae_sample=False` and compare on the posterior mean, or
give the same sample); they compute in bf16 (the noised reference, `scale_noise`'s σ cast to bf16); the subject
mask comes from BiRefNet and the caption from two Qwen calls, which minidit leaves to the user.
- Subject caption: appended as `prompt + ". " + caption` (`with_caption`). The authors make it with two LLM
  calls that anyone can reproduce with any captioner: a vision LLM (Qwen2-VL-7B-Instruct) is asked
  `DESCRIBE_TEMPLATE` about the reference image, then a text LLM (Qwen2.5-7B-Instruct) distils it with
  `FILTER_TEMPLATE` ({subject} = a subject word such as "stork", default "subject"). (The released infer.py
  passes the *user prompt* to the filter step instead of the image description; the paper describes the image.)

Not global state: nothing is stored across steps or layers; the reference K/V live only inside the forward pass
that computes them (unless a `cache=` keeps them for later calls whose reference pass is the same: refcache.py).
The reference costs one extra batch item up to the last vital layer: with FLUX.1's defaults (last vital layer
56 of 57) about 2x the compute of plain generation (bench/RESULTS.md, "FreeCus"); shared through a cache by
prompts that give the reference its own prompt, ~1.04x (bench/share.py).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import family, sampling, validate
# λ_r = 1.1: reference keys (Handler.register(scale=1.1) in the "save" pass); λ_p = 1.1: the target's text keys on
# vital layers (infer.py --extend_scale 1.1); the reference's noise schedules (their --mu_shift_type)
from .defaults import LAMBDA_PROMPT, LAMBDA_REF, MU_SHIFT_TYPES
from .masks import Reference, load_reference, require_nonempty, token_indices, token_mask_rule
from .presets import Settings, check_choice, document_settings
from .refcache import Entry, ReferenceCache
from .refstate import RefState

FLUX1_VITAL_LAYERS = (0, 1, 2, 17, 18, 25, 28, 53, 54, 56)  # for 19 double + 38 single blocks
FLUX1_DEPTHS = (19, 38)
DEFAULT_STEPS = {"dev": 30, "schnell": 4}  # the authors use 30 with FLUX.1-dev
GUIDANCE = 3.5
REF_TIMES = ("target", "sigma")
MU_FROM = ("tokens", "latent")
FC_MASK_RULES = ("area", "bilinear")
MASK_MODES = ("exclude", "zero")

CAPTION_SEPARATOR = ". "
DESCRIBE_TEMPLATE = ("Describe this {subject} briefly and precisely in max 20 words, focusing on its overall "
                     "appearance and key distinguishing features.")
FILTER_TEMPLATE = ("Please extract only the physical characteristics and features of the main {subject} from this "
                   "description, removing any information about actions, environment, background, other subjects, "
                   "or surrounding elements. Return only the extracted description without any additional "
                   "commentary. The description is: '{description}'")


# ------------------------------------------------------------------------------------------ pure functions

def default_steps(pipe) -> int:
    """The model's steps if its minidit.json states them, else 30 (the authors' with FLUX.1-dev) unless the
    pipeline's own default is schnell's 4."""
    if pipe.defaults.steps is not None:
        return pipe.defaults.steps
    return DEFAULT_STEPS["schnell" if pipe.default_steps == DEFAULT_STEPS["schnell"] else "dev"]


def with_caption(prompt: str, caption: str | None) -> str:
    """The authors' template: `prompt + ". " + caption` (no caption: the prompt unchanged)."""
    caption = (caption or "").strip()
    return prompt if not caption else prompt + CAPTION_SEPARATOR + caption


def default_vital_layers(depth: int, depth_single: int) -> list[int]:
    """FreeCus' vital layers for a model with `depth` double and `depth_single` single blocks: FLUX.1's indices
    [0, 1, 2, 17, 18 | 25, 28, 53, 54, 56] mapped to the same relative place within their block type
    (double i -> round(i·(depth-1)/18), single j -> depth + round(j·(depth_single-1)/37)), duplicates merged.
    Exact for FLUX.1 (19 + 38); the tiny 2 + 2 model gets [0, 1, 2, 3]."""
    D, S = FLUX1_DEPTHS

    def scale(i: int, n: int, N: int) -> int:  # index i of N blocks -> the same relative place of n blocks
        return math.floor(i * (n - 1) / (N - 1) + 0.5)

    out = set()
    for i in FLUX1_VITAL_LAYERS:
        if i < D:
            if depth > 0:
                out.add(scale(i, depth, D))
        elif depth_single > 0:
            out.add(depth + scale(i - D, depth_single, S))
    return sorted(out)


def check_vital_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """Sorted unique layer indices, each a valid attention layer 0..n_layers-1 of the loaded model. An empty
    list is an error: FreeCus without a vital layer shares nothing and would silently be plain generation."""
    out = set()
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"vital layers must be integers, got {i!r}")
        if not 0 <= i < n_layers:
            raise ValueError(f"vital layer {i} is out of range: this model has {n_layers} attention layers "
                             f"(double blocks first, then single blocks), indices 0..{n_layers - 1}")
        out.add(i)
    if not out:
        raise ValueError("vital_layers is empty: FreeCus would share no attention (plain generation; use "
                         "generate for that), give at least one layer index or None for the default")
    return sorted(out)


def released_ans_seq_len(height: int, width: int) -> int:
    """The image_seq_len of the released `flux_utils.pil_to_latents_flux`: it overwrites height/width with the
    latent size 2·(H//16) before computing `(height // 8 // 2) * (width // 8 // 2)` from them: 16 at 512², 1 at
    128², 64 at 1024² (the real image token count is 256 times that)."""
    return (2 * (int(height) // 16) // 16) * (2 * (int(width) // 16) // 16)


def _np_linspace(start: float, stop: float, n: int) -> list[float]:
    """numpy.linspace's float64 values (start + i·step, the last exactly `stop`), without numpy."""
    if n == 1:
        return [start]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [stop]


def reference_sigmas(steps: int, image_seq_len: int, ans: bool = True, shift: bool = True,
                     mu: float | None = None, shift_type: str | None = None,
                     timesteps: Tensor | None = None) -> Tensor:
    """σ'_i, the noise level of the reference at step i = 0..steps-1 (float32, (steps,)).

    shift_type (flux_utils.py `shift_type`; default "negative" if ans else "target"), s_i = 1 - i/steps,
    μ = calculate_mu(image_seq_len) unless `mu` is given:
      "negative" (ANS, the paper's adjusted noise shifting): FLUX's dynamic shift reversed, e^{-μ} for e^{μ}:
          σ'_i = e^{-μ} / (e^{-μ} + (1/s_i - 1)), so the reference is seen at lower noise than the target;
      "half_negative": -μ/2;  "twice_negative": -2μ;  "normal": +μ (FLUX's ordinary shift);
      "linear": no shift, σ'_i = floor(1000·s_i)/1000 in float32 (their 1000-entry table lookup);
      "target": the target's own noise level, `timesteps[:-1]` if given, else get_schedule(steps, seq, shift).
    The reversed shifts are applied for schnell too (its target schedule is unshifted; FreeCus was published
    with FLUX.1-dev only) — use "target" there to see the reference at the target's noise level."""
    shift_type = ("negative" if ans else "target") if shift_type is None else shift_type
    check_choice("shift_type", shift_type, MU_SHIFT_TYPES)
    if shift_type == "target":
        if timesteps is not None:
            return timesteps[:-1].float()
        return sampling.get_schedule(steps, image_seq_len, shift=shift)[:-1]
    if shift_type == "linear":
        s = torch.tensor(_np_linspace(1.0, 1.0 / steps, steps), dtype=torch.float64).float()
        return torch.floor(s * 1000) / 1000
    mu = sampling.calculate_mu(image_seq_len) if mu is None else mu
    factor = {"negative": -1.0, "half_negative": -0.5, "twice_negative": -2.0, "normal": 1.0}[shift_type]
    return sampling.get_schedule(steps, image_seq_len, shift=True, mu=factor * mu)[:-1]


def noised_reference(x_ref: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """z = (1 - σ)·x_ref + σ·ε, in fp32, returned in x_ref's dtype."""
    return ((1 - sigma) * x_ref.float() + sigma * eps.float()).to(x_ref.dtype)


def freecus_refstate(subject: Tensor, vital_layers: list[int], lambda_ref: float = LAMBDA_REF,
                     lambda_prompt: float = LAMBDA_PROMPT, mask_mode: str = "exclude") -> RefState:
    """The RefState of one FreeCus forward: batch item 0 is the reference; its subject tokens' K/V (own RoPE,
    keys ×λ_r) join the targets' attention on the vital layers, where the targets' text keys are ×λ_p;
    the reference leaves the batch after the last vital layer."""
    if mask_mode not in ("exclude", "zero"):
        raise ValueError(f"mask_mode must be 'exclude' or 'zero', got {mask_mode!r}")
    return RefState(n_ref=1, src=[subject], share=True, layers=frozenset(vital_layers), positions="own",
                    lambda_ref=lambda_ref, lambda_txt=lambda_prompt, mask_mode=mask_mode,
                    last_layer=max(vital_layers) if vital_layers else None)


# ------------------------------------------------------------------------------------------ the branch

class NoisedReference:
    """FreeCus' reference branch of `sampling.denoise`: at step i the clean reference latent x_ref (1, N, 64) is
    noised to σ'_i (`ref_sigmas`, (steps,)) with its fixed ε `ref_noise` and run as batch item 0 in front of the
    targets, told the time t_i (ref_time="target", the authors' code) or σ'_i ("sigma"); its subject tokens
    `subject` (K,) share their keys/values on the vital layers (`freecus_refstate`), after the last of which the
    reference leaves the batch. It has no trajectory of its own: its output is never used. ids (1, N, 3), txt
    (1, L, C), txt_ids (1, L, 3), vec (1, V): the reference's positions and prompt. `kept` (a refcache.Entry):
    the reference runs in a pass of its own before the targets', each step's keys/values are kept there, and a
    step already kept is read instead of run."""

    def __init__(self, model, x_ref: Tensor, ref_noise: Tensor, ref_sigmas: Tensor, subject: Tensor, ids: Tensor,
                 txt: Tensor, txt_ids: Tensor, vec: Tensor, vital_layers: Iterable[int] | None = None,
                 lambda_ref: float = LAMBDA_REF, lambda_prompt: float = LAMBDA_PROMPT, mask_mode: str = "exclude",
                 ref_time: str = "target", cond: Tensor | None = None, kept: Entry | None = None):
        cfg = model.cfg
        if vital_layers is None:
            vital_layers = default_vital_layers(cfg.depth, cfg.depth_single_blocks)
        vital = check_vital_layers(vital_layers, cfg.n_layers)
        check_choice("ref_time", ref_time, REF_TIMES)
        N = x_ref.shape[1]
        if ref_noise.shape != x_ref.shape or x_ref.shape[0] != 1:
            raise ValueError(f"the reference latent and its noise must be (1, N, 64) like one target, got "
                             f"{tuple(x_ref.shape)} and {tuple(ref_noise.shape)} (the reference must have the "
                             "target's size)")
        subject = subject.flatten().long()
        if subject.numel() == 0:
            raise ValueError("the subject mask is empty: no reference token to share")
        if int(subject.min()) < 0 or int(subject.max()) >= N:
            raise ValueError(f"subject token indices must lie in 0..{N - 1}")
        self.x_ref, self.ref_noise, self.ref_sigmas, self.ref_time = x_ref, ref_noise, ref_sigmas, ref_time
        self.ids, self.txt, self.txt_ids, self.vec, self.cond = ids, txt, txt_ids, vec, cond  # cond: Fill/control
        self.state = freecus_refstate(subject.to(x_ref.device), vital, lambda_ref, lambda_prompt, mask_mode)
        self.active = bool(vital)  # (check_vital_layers refuses an empty list; a test may patch it to allow one)
        self.kept, self.pending = kept, None

    def before(self, i: int, t: float, img: Tensor) -> tuple[Tensor, sampling.BranchInputs | None]:
        if not self.active:  # nothing shared: plain sampling, the reference is not run
            return img, None
        if i >= len(self.ref_sigmas):
            raise ValueError(f"need one reference noise level per step: got {len(self.ref_sigmas)}")
        if img.shape[1:] != self.x_ref.shape[1:]:
            raise ValueError(f"the reference latent must be (1, {img.shape[1]}, {img.shape[2]}) like one target, got "
                             f"{tuple(self.x_ref.shape)} (the reference must have the target's size)")
        sigma = float(self.ref_sigmas[i])
        z = noised_reference(self.x_ref, self.ref_noise, sigma).to(img.dtype)      # (1, N, 64) at noise level σ'_i
        tt = torch.full((1,), sigma if self.ref_time == "sigma" else t, device=img.device, dtype=img.dtype)
        if self.kept is None:  # one batch [reference; targets]
            return img, sampling.BranchInputs(z, self.ids, self.txt, self.txt_ids, self.vec, tt, self.state,
                                              self.cond)
        if self.kept.cached(i):  # the step's keys/values were kept: the reference does not run
            self.kept.cache.hits += 1
            return img, sampling.BranchInputs(z[:0], self.ids[:0], self.txt[:0], self.txt_ids[:0], self.vec[:0],
                                              tt[:0], replace(self.state, kept=self.kept.rows[i]),
                                              None if self.cond is None else self.cond[:0], separate=True)
        self.pending = self.state.recording()  # the reference alone, keeping what the targets read
        return img, sampling.BranchInputs(z, self.ids, self.txt, self.txt_ids, self.vec, tt, self.pending, self.cond,
                                          separate=True)

    def after(self, i: int, t: float, t_next: float, v: Tensor, img: Tensor) -> Tensor:
        """The reference is re-noised from x_ref at every step: nothing to carry (but the rows to keep)."""
        if self.kept is not None and not self.kept.cached(i):
            self.kept.keep(i, self.pending.kept, None)
        return img


@dataclass(frozen=True)
class FreeCusSettings(Settings):
    """Settings of `freecus`: `.paper()` (the paper's method, minidit's defaults) or `.official()` (the released
    code: github.com/Monalissaa/FreeCus infer.py, flux_utils.py, sa_handler_for_flux_clean.py)."""
    lambda_ref: float = LAMBDA_REF           # λ_r on the reference keys (their save pass: always 1.1)
    lambda_prompt: float = LAMBDA_PROMPT     # λ_p on the targets' text keys, vital layers (--extend_scale)
    vital_layers: tuple[int, ...] | None = None  # None: default_vital_layers of the model (FLUX.1's ten)
    mu_shift_type: str = "negative"          # the reference's noise schedule (reference_sigmas' shift_type)
    mu_from: str = "tokens"                  # μ from the image token count ("tokens") or flux_utils' "latent"
    ans_mu: float | None = None              # μ given directly (overrides mu_from)
    ref_time: str = "target"                 # the time the model is told for the reference: "target" | "sigma"
    mask_mode: str = "exclude"               # masked-out reference keys: "exclude" (gathered) | "zero"
    mask_rule: str = "area"                  # pixel mask -> tokens: "area" (>= 50 %) | "bilinear" (infer.py)
    vae_sample: bool = False                 # VAE posterior sample (True) or mean (False) of the reference
    vae_seed: int | None = None              # CPU generator seed of that sample; None: the run's seed

    def __post_init__(self):
        if self.vital_layers is not None:
            if isinstance(self.vital_layers, (str, bytes)) or not isinstance(self.vital_layers, Iterable):
                raise TypeError(f"vital_layers must be a sequence of layer indices, got {self.vital_layers!r}")
            object.__setattr__(self, "vital_layers", tuple(self.vital_layers))
        for name in ("lambda_ref", "lambda_prompt"):
            validate.number(name, getattr(self, name), 0.0, validate.MAX_LAMBDA, lo_open=True)
        if self.ans_mu is not None:
            validate.number("ans_mu", self.ans_mu)
        if self.vae_seed is not None:
            validate.seed(self.vae_seed)
        check_choice("mu_shift_type", self.mu_shift_type, MU_SHIFT_TYPES)
        check_choice("mu_from", self.mu_from, MU_FROM)
        check_choice("ref_time", self.ref_time, REF_TIMES)
        check_choice("mask_mode", self.mask_mode, MASK_MODES)
        check_choice("mask_rule", self.mask_rule, FC_MASK_RULES)

    @classmethod
    def paper(cls) -> "FreeCusSettings":
        return cls()

    @classmethod
    def official(cls) -> "FreeCusSettings":
        return cls(mu_from="latent",      # flux_utils.pil_to_latents_flux: image_seq_len from the latent size
                   mask_rule="bilinear",  # infer.py: nnf.interpolate(mask, (H/16, W/16), "bilinear") > 0
                   vae_sample=True)       # flux_utils._encode_vae_image: latent_dist.sample(None)

    def mu(self, height: int, width: int) -> float:
        """μ of the reference's shift at this size (`ans_mu` if set)."""
        if self.ans_mu is not None:
            return float(self.ans_mu)
        h, w = sampling.latent_size(height, width)
        seq = (h // 2) * (w // 2) if self.mu_from == "tokens" else released_ans_seq_len(height, width)
        return sampling.calculate_mu(seq)


@document_settings(FreeCusSettings)
@torch.no_grad()
def freecus(pipe, prompt: str | list[str], reference: Reference, caption: str | None = None, *,
            seed: int | list[int] = 0, steps: int | None = None, guidance: float | None = None,
            height: int | None = None, width: int | None = None, num_images: int = 1, ref_seed: int | None = None,
            preset: str | FreeCusSettings = "paper", progress: bool = False, return_latents: bool = False,
            image=None, mask=None, control_image=None, reference_control=None, cache: ReferenceCache | None = None,
            **settings):
    """FreeCus: `num_images` images per prompt of the subject of `reference` (Reference(image, mask, prompt)).
    On FLUX.1 Fill: image= the scene, mask= the region to inpaint the subject into (white); on a control model:
    control_image= the targets' depth/edge map, reference_control= the reference's (default the same): see
    family.freecus_conditioning (guidance default 30 on Fill).

    caption: a short description of the subject, appended to every prompt as `prompt + ". " + caption` (make it
    with any captioner: see DESCRIBE_TEMPLATE and FILTER_TEMPLATE). reference.prompt: the reference's prompt
    (default: the first full target prompt, as the authors). height/width/guidance: None = the model's
    (`pipe.defaults`; the reference is resized to the size); steps: None = `default_steps(pipe)`.
    ref_seed: the seed of the reference's ε (default: `seed`, so ε is the first target's initial noise).
    preset: "paper" (default), "official" (the released code) or a FreeCusSettings; any field below given as a
    keyword overrides just that field (`FreeCusSettings.resolve(preset, **settings)`): λ_r = lambda_ref on the
    reference keys, λ_p = lambda_prompt on the target's text keys, both on vital layers only; vital_layers:
    attention-layer indices (double blocks then single blocks), None = `default_vital_layers` of the loaded
    model; mu_shift_type: see `reference_sigmas` ("target": no ANS).
    cache: a refcache.ReferenceCache shared by calls whose reference pass is the same (the same reference, seed
    and reference prompt: give `reference.prompt` to share it across target prompts), read bit-identically."""
    s = FreeCusSettings.resolve(preset, **settings)
    scene, region = image, mask  # (the names image/mask are the reference's below)
    if isinstance(reference, (list, tuple)):
        if len(reference) != 1:
            raise ValueError(f"FreeCus takes one reference, got {len(reference)}")
        reference = reference[0]
    if guidance is None and pipe.transformer.cfg.variant == "fill":
        guidance = family.FILL_GUIDANCE
    height, width, guidance = pipe.with_defaults(height, width, guidance, image_input=True)[:3]
    validate.generate_args(height, width, steps, guidance, seed, num_images)
    if ref_seed is not None:
        validate.seed(ref_seed)
    cfg = pipe.transformer.cfg
    vital = check_vital_layers(default_vital_layers(cfg.depth, cfg.depth_single_blocks) if s.vital_layers is None
                               else s.vital_layers, cfg.n_layers)
    image, mask = load_reference(reference, height, width, "reference")
    height, width = image.shape[1:]
    subject = token_indices(require_nonempty(token_mask_rule(mask, s.mask_rule), "the reference's subject mask"))
    h, w = sampling.latent_size(height, width)
    seq_len = (h // 2) * (w // 2)
    steps = default_steps(pipe) if steps is None else steps

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [with_caption(p, caption) for p in prompts for _ in range(num_images)]
    ref_prompt = prompts[0] if reference.prompt is None else reference.prompt
    B = len(prompts)
    # one text-encoder call for the reference and the targets
    txt, txt_ids, vec = pipe.encode_prompt([ref_prompt] + prompts)

    first_seed = seed if isinstance(seed, int) else seed[0]
    x_ref = pipe.encode_reference(image[None], s.vae_sample, first_seed if s.vae_seed is None else s.vae_seed)
    eps = sampling.noise(1, height, width, ref_seed if ref_seed is not None else first_seed, pipe.device, pipe.dtype)
    img = sampling.noise(B, height, width, seed, pipe.device, pipe.dtype)
    ref_cond, cond, finish = family.freecus_conditioning(pipe, image, B, first_seed, image=scene, mask=region,
                                                         control_image=control_image,
                                                         reference_control=reference_control)
    timesteps = pipe.schedule(steps, height, width)
    sigmas = reference_sigmas(steps, seq_len, mu=s.mu(height, width), shift_type=s.mu_shift_type,
                              timesteps=timesteps)
    ids = sampling.image_ids(1, height, width, pipe.device)
    kept = None if cache is None else cache.entry(
        "freecus", id(pipe.transformer), str(pipe.dtype), x_ref, eps, sigmas, subject, ids, txt[:1], txt_ids[:1],
        vec[:1], ref_cond, vital, s.lambda_ref, s.lambda_prompt, s.mask_mode, s.ref_time, timesteps, guidance)
    with pipe.use(pipe.transformer) as model:
        branch = NoisedReference(model, x_ref, eps, sigmas, subject, ids, txt[:1], txt_ids[:1], vec[:1], vital,
                                 s.lambda_ref, s.lambda_prompt, s.mask_mode, s.ref_time, cond=ref_cond, kept=kept)
        img = sampling.denoise(model, img, sampling.image_ids(B, height, width, pipe.device), txt[1:], txt_ids[1:],
                               vec[1:], timesteps, guidance, progress, branch=branch, desc="freecus", img_cond=cond)
    img = finish(img)
    return img if return_latents else pipe.decode(img, height, width)
