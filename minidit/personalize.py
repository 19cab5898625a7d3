"""Personalize Anything (Feng et al., 2025), natively: training-free subject personalization, layout control,
multi-subject / subject-scene composition, inpainting and outpainting with FLUX.1.

    images = pipe.personalize("a cat on a beach", Reference("cat.png", mask="cat_mask.png"), placement=(64, 0))
    toys = [Reference("a.png", "a_mask.png"), Reference("b.png", "b_mask.png")]
    images = pipe.personalize("two toys in a garden", toys, placement=[(0, 0, 512, 1024), (512, 0, 512, 1024)])
                                                                # target boxes (x, y, w, h), one per reference
    images = pipe.inpaint("photo.png", "edit_mask.png", "a castle on the hill")
    images = pipe.outpaint("photo.png", "a wide valley", canvas=(1024, 768))

Follow one token from the reference image into the target
-----------------------------------------------------------
1. The reference image is VAE-encoded to a packed latent y0 (N tokens of 64 values; one token = a 16x16 pixel
   patch) and *inverted* (`invert`): a controlled rectified-flow ODE (RF-Inversion, Rout et al. 2024, Alg. 1) runs
   from t = 0 (image) to t = 1 (noise) on the same time grid the sampler uses, with the velocity
   û = u(Y, t) + γ (u_cond - u(Y, t)),  u_cond = (ε - Y) / (1 - t)  pulling towards one seeded noise sample ε.
   The authors use γ = 1 (the default): the controller is fully in charge, u is never needed, and the inverted
   latent is exactly ε (here on one consistent grid; the authors' step sizes differ slightly, so theirs is close
   to ε). γ < 1 mixes in the model's own field (γ = 0: plain Euler inversion), evaluated at the grid times (the
   authors' pipeline feeds the model i/n there).
2. Generation runs ONE batch  [ref_0, ..., ref_{n-1}, target_0, ...]  (refstate.py). The reference items start
   from their inverted latents and *re-trace* their image with the controlled reverse ODE
   v̂ = v + η (v_cond - v),  v_cond = (x - y0) / t  (Alg. 2): with η = 1 (steps start·n <= i < stop·n, the
   authors' 0 and 0.99) the reference stays exactly on the path x_t = (1 - t)·y0 + t·ε, so at every step and every
   layer its tokens are the reference image's tokens at the current noise level, computed by the same network as
   the target: nothing is stored, the reference is simply one more batch item.
3. Pick a subject token at (row, col) of the reference's token grid; its flat index p = row·w + col is in `src`.
   Layout control moves it to p' = p + dy·w + dx in the target (`dst`): a translation by an offset, or the one that
   centres the subject in a target box (masks.translate / box_offset). Patch perturbation (personalization only)
   first (a) dilates or erodes the subject mask with a 5x5 kernel and (b) shuffles which subject token goes where
   inside 3x3 windows (masks.augment_mask, local_shuffle); both are drawn once per image from `seed`.
4. Early steps, t > τ (token replacement): in every double and single block, after the row-wise q/k/v projection
   and QK-norm (so exactly "before the projections", refstate.RefState.replace_tokens), the target's q, k and v
   rows at p' are overwritten by the reference's rows at p. RoPE is applied afterwards with the target's own
   position ids, so the token sits at its new place; the target's residual stream and MLP are untouched.
5. Later steps, t <= τ (multi-modal attention): no replacement; instead the reference subject tokens join the
   target's joint attention as extra keys/values (`concat=True`), rotated at the target region's positions
   (`positions="target"`, the authors' code) or left unrotated, i.e. at position (0, 0, 0) (`positions="zero"`, the
   paper). The authors also append them as queries whose outputs are dropped; a dropped query changes no other
   output, so minidit does not compute them. (Their code, when this is switched on, appends the tokens at every
   step and for every batch item; the paper — and minidit — only after τ and only for the targets, the reference
   items attend normally.) The target then generates freely around the subject.
6. Each Euler step moves every item; the model returns the targets' velocities and the references' (which the
   controlled ODE mostly overrides). The references leave the batch as soon as nothing reads them any more
   (after the last replacement step when `concat=False`), so the extra cost is one batch item per reference for
   as long as it is used.

τ and time. The sampler's normalised time t goes from 1 (noise) to 0 (image) over `steps` Euler steps; step i
runs at t_i = shift(1 - i/steps) (sampling.get_schedule: the dev time shift, identity for schnell). τ is given in
the same normalised time before the shift, i.e. as a fraction of the steps: a step replaces while
t_i > τ_t = shift(τ), which is exactly  1 - i/steps > τ,  i.e. the first  ceil((1 - τ)·steps)  steps
(`replace_steps`, `tau_threshold`). τ = 0.8 (default): the first 20 % of the steps replace (28 steps: 6);
τ = 1.0: never; τ = 0: always. Editing uses τ = 0.1: the first 90 % replace. (The authors' code compares the
*shifted* time directly with its τ: its 0.8 replaces on 13 of 28 steps at 1024² with FLUX.1-dev, 9 at 512²; its
demo default 0.5 on 22 resp. 19. minidit's τ is the step fraction the paper's "τ = 0.8T" describes; the
authors' behaviour is `tau = 1 - replace_steps_theirs / steps`.)

Editing (inpainting / outpainting): the preserved region is the reference (same place, no perturbation,
τ = 0.1, no later-stage tokens as in the authors' demo), and at the replacement steps the target's latent inside
the preserved region is also set to the reference trajectory (`blend`), so the preserved pixels follow the
reference and only the last 10 % of the steps harmonise them with the new content. Outpainting pastes the image
on a larger black canvas (as the authors' demo does) and preserves the pasted area.

Multi-subject: one reference branch per subject, injected in order into its own target region; regions must be
disjoint (overlaps are refused with an error: the later subject would silently overwrite the earlier one).
Subject-scene composition: `scene=Reference(scene_image, mask=None)` is one more reference kept in place, its
region = its mask minus the subjects' regions; it is not perturbed.

Masks: greyscale/PNG, white = subject, at the reference image's size (or an (x, y, w, h) pixel box as shorthand,
None = whole image). A token belongs to the subject when at least half of its 16x16 patch is white
(masks.token_mask, threshold 0.5); editing keeps a token only when its whole patch is preserved (threshold 1).
minidit ships no segmenter: make masks with any tool (SAM / Grounded-SAM as the authors do, rembg, BiRefNet, or
a paint program), or pass a box.

Authors' defaults (github.com/fenghora/personalize-anything: src/pipeline.py, src/attn_processor.py,
gradio_demo.py, notebooks): 28 steps, guidance 3.5, inversion with an empty prompt and γ = 1 (guidance 0),
generation with η = 1 on steps [0, 0.99·n), token replacement on q/k/v of every attention layer while t > τ,
concatenated concept tokens (off in all released demos) at the target region's positions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import sampling
from .masks import (PATCH, Reference, augment_mask, box_mask, box_offset, image_tensor, load_reference, local_shuffle,
                    pixel_mask, pixels_to_tokens, require_nonempty, resize_image, token_indices, token_mask, translate)
from .refstate import RefState

TAU = 0.8             # personalization: the first 20 % of the steps replace tokens
TAU_EDIT = 0.1        # inpainting / outpainting: the first 90 % replace
GAMMA = 1.0           # RF-Inversion controller strength (inversion)
ETA = 1.0             # RF-Inversion controller strength (reference branch during generation)
START, STOP = 0.0, 0.99
INVERT_GUIDANCE = 0.0  # the authors invert with guidance 0 (RF-Inversion's recommendation)
SHUFFLE_WINDOW = 3
MORPH_KERNEL = 5
POSITIONS = ("target", "zero")


# --------------------------------------------------------------------------------------------- time and τ

def check_tau(tau: float) -> float:
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be in [0, 1] (a fraction of the normalised time; 0.8 = replace during the first "
                         f"20% of the steps), got {tau}")
    return float(tau)


def replace_steps(tau: float, steps: int) -> int:
    """How many early steps replace tokens: #{i : 1 - i/steps > τ} = ceil((1 - τ)·steps) (up to float noise)."""
    return max(0, math.ceil((1.0 - check_tau(tau)) * steps - 1e-9))


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
                  progress: bool = False) -> Tensor:
    """Controlled forward ODE from t = 0 to 1 over the reversed grid: Y += (s' - s)·(u + γ·((ε - Y)/(1 - s) - u)).
    γ = 1 never calls the model (u would be multiplied by 0). Returns the latent at t = 1."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    B = y0.shape[0]
    g = sampling.guidance_vector(model, B, guidance, y0.device, y0.dtype) if gamma < 1 else None  # model: γ < 1 only
    ts = timesteps.flip(0).tolist()  # 0 -> 1
    bar = sampling.Progress(len(ts) - 1, progress, desc="invert")
    y = y0.float()
    for s, s_next in zip(ts[:-1], ts[1:]):
        u_cond = (noise.float() - y) / (1.0 - s)
        if gamma < 1:
            u = model(y.to(y0.dtype), img_ids, txt, txt_ids, torch.full((B,), s, device=y0.device, dtype=y0.dtype),
                      vec, g).float()
            u_cond = u + gamma * (u_cond - u)
        y = y + (s_next - s) * u_cond
        bar.update()
    return y.to(y0.dtype)


def invert(pipe, image, prompt: str = "", *, steps: int | None = None, height: int | None = None,
           width: int | None = None, gamma: float = GAMMA, guidance: float | None = INVERT_GUIDANCE, seed: int = 0,
           progress: bool = False) -> Inversion:
    """Encode and invert a reference image (path, PIL or (3, H, W) tensor in [-1, 1]) on the grid of `steps`
    steps at height x width (default: the image's size; a different size resizes the image). ε is
    `sampling.noise(1, H, W, seed)`."""
    x = image_tensor(image)
    H, W = (height or x.shape[1]), (width or x.shape[2])
    x = resize_image(x, H, W)
    timesteps = pipe.schedule(steps, H, W)
    y0 = pipe.encode_image(x[None])
    return _invert_encoded(pipe, y0, prompt, timesteps, H, W, gamma, guidance, seed, progress)


def _invert_encoded(pipe, y0, prompt, timesteps, H, W, gamma, guidance, seed, progress) -> Inversion:
    noise = sampling.noise(1, H, W, seed, pipe.device, pipe.dtype)
    ids = sampling.image_ids(1, H, W, pipe.device)
    if gamma >= 1:  # the controller alone: no model call, no prompt needed
        xT = invert_latent(None, y0, ids, None, None, None, timesteps, noise, gamma, guidance, progress)
    else:
        txt, txt_ids, vec = pipe.encode_prompt([prompt])
        with pipe._use(pipe.transformer) as model:
            xT = invert_latent(model, y0, ids, txt, txt_ids, vec, timesteps, noise, gamma, guidance, progress)
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
                            keep_references: bool = False, progress: bool = False,
                            trace: list | None = None) -> tuple[Tensor, Tensor | None]:
    """Euler sampling of the batch [references; targets].

    x_ref (n, N, 64) the references' inverted latents, y0 (n, N, 64) their clean latents, img (T, N, 64) the
    targets' noise; txt / txt_ids / vec for all n + T items (references first); img_ids (1, N, 3).
    Steps i < n_replace replace tokens (RefState.replace); later steps share the reference tokens as keys/values
    when `concat`. `blend` also sets the targets' latents in the regions to the references' at the replacement
    steps (editing). The references leave the batch once nothing reads them (unless `keep_references`).
    `trace` (tests): gets one dict per step (step, t, n_ref, replace, share, x = the step's input latents, layers =
    RefState's (layer, q, k, v) records). Returns (targets' latents (T, N, 64), references' latents or None).
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    n, T, steps = x_ref.shape[0], img.shape[0], len(timesteps) - 1
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    early = late = None
    if regions:
        if len(regions) != n:
            raise ValueError(f"need one region per reference: {n} references, {len(regions)} regions")
        regions = [Region(reg.src.to(img.device), reg.dst.to(img.device), reg.mask_op) for reg in regions]
        src, dst = [reg.src for reg in regions], [reg.dst for reg in regions]
        early = RefState(n, src, dst, replace=True)
        late = RefState(n, src, dst, share=True, positions=positions) if concat else None
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


# --------------------------------------------------------------------------------------------- entry points

def personalize(pipe, prompt: str, reference: Reference | list[Reference], *, placement=None,
                scene: Reference | None = None, tau: float = TAU, perturb: bool = True, positions: str = "target",
                concat: bool = True, height: int | None = None, width: int | None = None, steps: int | None = None,
                guidance: float = 3.5, seed: int = 0, num_images: int = 1, gamma: float = GAMMA, eta: float = ETA,
                start: float = START, stop: float = STOP, progress: bool = False, return_latents: bool = False,
                trace: list | None = None):
    """Generate `prompt` with the subject(s) of `reference` (one Reference or a list: multi-subject) placed by
    `placement` (None = where it is, (dx, dy) pixel offset, (x, y, w, h) target box; a list for several
    references) and optionally a `scene` reference filling the rest. Returns `num_images` PIL images.
    Reference i is inverted with seed + 1 + i; the targets' noise is `sampling.noise(num_images, H, W, seed)`
    (what `generate` uses). See the module docstring for τ, perturbation, positions and concat."""
    check_tau(tau)
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS} ('target' = the authors' code, 'zero' = the paper), "
                         f"got {positions!r}")
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
    tokens = [token_mask(m) for m in masks]
    for r, tk in enumerate(tokens):
        require_nonempty(tk, f"reference {r}'s subject mask")
    offsets = [_offset(p, tk, r) for r, (p, tk) in enumerate(zip(placement, tokens))]
    scene_tokens = None
    if scene is not None:
        xs, ms = load_reference(scene, height, width, "the scene")
        images.append(xs)
        scene_tokens = require_nonempty(token_mask(ms), "the scene mask")
        refs = refs + [scene]
    regions = plan_regions(tokens, offsets, perturb, torch.Generator().manual_seed(seed), scene_tokens)
    latents = _run(pipe, prompt, images, [r.prompt or "" for r in refs], regions, height, width, steps=steps,
                   guidance=guidance, seed=seed, num_images=num_images, tau=tau, concat=concat, positions=positions,
                   gamma=gamma, eta=eta, start=start, stop=stop, blend=False, progress=progress, trace=trace)
    return latents if return_latents else pipe.decode(latents, height, width)


def _is_list_of_placements(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(q is None or isinstance(q, (list, tuple)) for q in p)


def inpaint(pipe, image, mask, prompt: str, *, tau: float = TAU_EDIT, steps: int | None = None,
            guidance: float = 3.5, seed: int = 0, num_images: int = 1, image_prompt: str = "", concat: bool = False,
            positions: str = "target", gamma: float = GAMMA, eta: float = ETA, start: float = START,
            stop: float = STOP, progress: bool = False, return_latents: bool = False, trace: list | None = None):
    """Repaint the white region of `mask` (path / PIL / (H, W) tensor / (x, y, w, h) box, at the image's size)
    following `prompt`; everything else is preserved (the reference, τ = 0.1 by default, no perturbation)."""
    x = image_tensor(image)
    H, W = x.shape[1:]
    resize_image(x, H, W)  # checks the size
    edit = pixel_mask(mask, H, W, "edit mask")
    if not (edit > 0).any():
        raise ValueError("the edit mask is empty: nothing to repaint (white = the region to repaint)")
    return _edit(pipe, x, token_mask(1 - edit, threshold=1.0), prompt, steps=steps, guidance=guidance, seed=seed,
                 num_images=num_images, image_prompt=image_prompt, tau=tau, concat=concat, positions=positions,
                 gamma=gamma, eta=eta, start=start, stop=stop, progress=progress, return_latents=return_latents,
                 trace=trace)


def outpaint(pipe, image, prompt: str, canvas: tuple[int, int], *, offset: tuple[int, int] | None = None,
             tau: float = TAU_EDIT, steps: int | None = None, guidance: float = 3.5, seed: int = 0,
             num_images: int = 1, image_prompt: str = "", concat: bool = False, positions: str = "target",
             gamma: float = GAMMA, eta: float = ETA, start: float = START, stop: float = STOP,
             progress: bool = False, return_latents: bool = False, trace: list | None = None):
    """Extend `image` to a canvas of (W, H) pixels: the image is pasted at `offset` (x, y) of its top-left corner
    (default: centred, rounded down to 16 px) on a black canvas; its area is preserved, the rest generated."""
    x = image_tensor(image)
    h, w = x.shape[1:]
    W, H = (int(v) for v in canvas)
    sampling.latent_size(H, W)  # the canvas; the image itself may have any size that fits on it
    if offset is None:
        offset = ((W - w) // 2 // PATCH * PATCH, (H - h) // 2 // PATCH * PATCH)
    ox, oy = (int(v) for v in offset)
    if ox < 0 or oy < 0 or ox + w > W or oy + h > H:
        raise ValueError(f"the {w}x{h} image at offset ({ox}, {oy}) does not fit on the {W}x{H} canvas")
    full = torch.full((3, H, W), -1.0)
    full[:, oy:oy + h, ox:ox + w] = x
    keep = token_mask(box_mask((ox, oy, w, h), H, W), threshold=1.0)
    return _edit(pipe, full, keep, prompt, steps=steps, guidance=guidance, seed=seed, num_images=num_images,
                 image_prompt=image_prompt, tau=tau, concat=concat, positions=positions, gamma=gamma, eta=eta,
                 start=start, stop=stop, progress=progress, return_latents=return_latents, trace=trace)


def _edit(pipe, x: Tensor, keep: Tensor, prompt: str, *, return_latents: bool, image_prompt: str, **kw):
    if not keep.any():
        raise ValueError("nothing is preserved: no 16x16 token lies entirely outside the edit region "
                         "(use generate for a new image)")
    if keep.all():
        raise ValueError("nothing to generate: every token is preserved")
    check_tau(kw["tau"])
    H, W = x.shape[1:]
    idx = token_indices(keep)
    latents = _run(pipe, prompt, [x], [image_prompt], [Region(idx, idx.clone())], H, W, blend=True, **kw)
    return latents if return_latents else pipe.decode(latents, H, W)


def _run(pipe, prompt: str, images: list[Tensor], ref_prompts: list[str], regions: list[Region], H: int, W: int, *,
         steps, guidance, seed, num_images, tau, concat, positions, gamma, eta, start, stop, blend, progress, trace):
    """Invert the references, then sample the batch [references; targets] -> the targets' packed latents."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    timesteps = pipe.schedule(steps, H, W)
    n_steps = len(timesteps) - 1
    n_replace = replace_steps(tau, n_steps)
    needed = n_replace > 0 or concat
    if needed:
        y0 = pipe.encode_image(torch.stack(images))
        inv = [_invert_encoded(pipe, y0[r:r + 1], ref_prompts[r], timesteps, H, W, gamma, INVERT_GUIDANCE,
                               seed + 1 + r, progress) for r in range(len(images))]
        x_ref = torch.cat([i.noise for i in inv])
    else:  # τ = 1 and no later-stage tokens: the references would never be read
        ref_prompts, regions = [], []
        x_ref = y0 = torch.zeros(0, (H // 16) * (W // 16), 64, device=pipe.device, dtype=pipe.dtype)
    txt, txt_ids, vec = pipe.encode_prompt(list(ref_prompts) + [prompt] * num_images)
    img = sampling.noise(num_images, H, W, seed, pipe.device, pipe.dtype)
    with pipe._use(pipe.transformer) as model:
        out, _ = denoise_with_references(
            model, x_ref, y0, img, sampling.image_ids(1, H, W, pipe.device), txt, txt_ids, vec, timesteps, guidance,
            regions, n_replace=n_replace if needed else 0, concat=concat, positions=positions, eta=eta, start=start,
            stop=stop, blend=blend, progress=progress, trace=trace)
    return out
