"""The FLUX.1 family around the same MMDiT: Fill, Depth/Canny (control) and Kontext are a few lines of
conditioning handed to the one sampling loop (`sampling.denoise(img_cond=, img_cond_seq=, img_cond_seq_ids=)`).

    pipe = Pipeline.load("/models/FLUX.1-Fill-dev")
    pipe.fill("room.png", "room_mask.png", "a red armchair")                # white = repaint
    pipe.fill_outpaint("room.png", "a wide living room", canvas=(1024, 768))
    pipe = Pipeline.load("/models/FLUX.1-dev", loras=[("flux1-depth-dev-lora.safetensors", 1.0)])
    pipe.generate("a robot in a forest", control_image="depth.png")          # Depth/Canny: any control model
    pipe = Pipeline.load("/models/FLUX.1-Kontext-dev")
    pipe.kontext("cat.png", "make the cat wear a hat")
    pipe.kontext(["cat.png", "hat.png"], "the cat wearing this hat")          # several references

What each member computes (diffusers 0.42.1 `pipelines/flux/pipeline_flux_{fill,control,kontext}.py`, BFL's
`src/flux/sampling.py: prepare_fill / prepare_control / prepare_kontext, denoise`):
- Fill (img_in 384): the image resized to H x W (Lanczos), [-1, 1]; the mask greyscale, resized (Lanczos),
  binarized at >= 0.5 (diffusers' mask_processor; BFL's prepare_fill does not binarize); masked image =
  image x (1 - mask). Per step the model sees [noise 64 | masked-image latents 64 | mask 256], the mask packed
  as its 8x8 latent-pixel blocks (B, H, W) -> (B, 64, h, w) -> 2x2 tokens (`pack_mask`). Random draws from one
  generator, in diffusers' order: a VAE sample of the image (drawn even at strength 1), the noise, a VAE sample
  of the masked image. Defaults 50 steps, guidance 30 (both). The output is not composited with the input.
- Control (img_in 128, Depth/Canny, or dev + BFL's control LoRA): the control image at the output size, encoded
  with ONE posterior sample for the whole batch, drawn BEFORE the noise; [noise | control latents] per step.
  minidit computes no depth map nor Canny edges (BFL's are cv2.Canny(img, 50, 200) and Depth Anything): the user
  brings them (README). A control image of another size than the output is an error (a map stretched to
  another aspect no longer lines up; diffusers resizes it silently).
- Kontext (img_in 64, dev's shapes): the reference's size floored to 16, then the preferred resolution of the
  closest aspect ratio (PREFERRED_KONTEXT_RESOLUTIONS, Lanczos; `auto_resize=False` keeps the floored size),
  encoded with the posterior MEAN (no draw: the noise is the first draw). Its tokens are appended after the image
  tokens with RoPE ids (1, row, col) on their own grid, the prediction is cut to the image tokens, and μ of the
  schedule comes from the image token count alone.
  Output size: given height/width -> diffusers' rule (~max_area pixels at that aspect ratio, floored to 16);
  none given -> BFL's `prepare_kontext` rule (the reference's preferred resolution: the aspect is kept; diffusers
  would make 1024 x 1024 whatever the input). Defaults: 28 steps (diffusers; BFL's cli_kontext 30) and guidance
  2.5 (BFL's cli_kontext; diffusers 3.5: pass guidance=3.5 for its result).
  Several references: diffusers 0.42 has none (a list is a batch there) and BFL's code takes one; minidit follows
  ComfyUI's default "offset" placement (comfy/ldm/flux/model.py `_forward`, ref_latents_method "offset"): every
  reference has index 1 on the first axis, and each next one is shifted right or down past the ones before
  (right when that keeps the union squarer), so no two references share a position (`kontext_ids`).
Seeds: an int (or one generator) draws as diffusers; a list gives image i its own generator for all of its draws,
so image i equals a one-image run with seed i (diffusers draws a list's VAE samples from the first generator).
"""
from __future__ import annotations

import functools

import torch
from PIL import Image
from torch import Tensor

from . import sampling, validate
from .image import fit_image, load_mask, open_image, pil_to_tensor, to_rgb
from .masks import image_tensor, token_mask
from .regions import outpaint_canvas

FILL_STEPS, FILL_GUIDANCE = 50, 30.0          # FluxFillPipeline and BFL's cli_fill
KONTEXT_STEPS, KONTEXT_GUIDANCE = 28, 2.5     # diffusers' steps, BFL cli_kontext's guidance (diffusers: 3.5)
KONTEXT_MAX_AREA = 1024 ** 2
# (width, height): diffusers' PREFERRED_KONTEXT_RESOLUTIONS = BFL's PREFERED_KONTEXT_RESOLUTIONS
PREFERRED_KONTEXT_RESOLUTIONS = [(672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
                                 (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
                                 (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672)]
INSTEAD = {"fill": "pipe.fill / pipe.fill_outpaint (minidit fill)", "control": "generate(control_image=) (--control)",
           "kontext": "pipe.kontext (minidit kontext)"}


def require_variant(pipe, variant: str, what: str) -> None:
    """A one-line error unless the pipeline's transformer is the FLUX.1 family member `variant`."""
    have = pipe.transformer.cfg.variant
    if have != variant:
        raise ValueError(f"{what} needs a FLUX.1 {variant} model; {pipe.name} is a FLUX.1 {have} model"
                         + (f" (use {INSTEAD[have]})" if have in INSTEAD else ""))


def base_model_only(method):
    """Wrap a method that feeds the model 64 channels of latents (img2img, personalize, inpaint, outpaint,
    invert) so that a Fill or control model is refused before any work, pointing to its own entry point."""
    @functools.wraps(method)
    def checked(pipe, *args, **kwargs):
        variant = pipe.transformer.cfg.variant
        if variant in ("fill", "control"):
            raise ValueError(f"{method.__name__} runs on FLUX.1 dev/schnell/Kontext; {pipe.name} is a FLUX.1 "
                             f"{variant} model: use {INSTEAD[variant]}")
        return method(pipe, *args, **kwargs)
    return checked


def generators(seed: sampling.Seed, batch: int) -> list:
    """The generators of a family call: [one for the whole batch] or one per image (a seed list)."""
    gen = sampling.generator(seed, batch)
    return gen if isinstance(gen, list) else [gen]


# ------------------------------------------------------------------------------------------------------ Fill

def pack_mask(mask: Tensor) -> Tensor:
    """(B, 1, H, W) pixel mask -> (B, N, 256): each latent pixel's 8x8 block as 64 channels, then 2x2 tokens
    (diffusers' FluxFillPipeline.prepare_mask_latents; BFL's prepare_fill rearranges the same way)."""
    B, _, H, W = mask.shape
    h, w = H // 8, W // 8
    m = mask[:, 0].reshape(B, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(B, 64, h, w)
    return sampling.pack(m)


def fill_inputs(image, mask, height: int | None, width: int | None) -> tuple[Tensor, Tensor]:
    """-> image (1, 3, H, W) in [-1, 1], binarized mask (1, 1, H, W), white = repaint. The mask must have the
    image's size; both are resized (Lanczos) to H x W, default the image's size floored to 16."""
    img = to_rgb(open_image(image, "image"))
    m = load_mask(mask, (img.height, img.width))  # (h, w) in [0, 1]: the image's size or an error
    H, W = height or img.height // 16 * 16, width or img.width // 16 * 16
    validate.image_size(H, W, what="fill ")
    x = pil_to_tensor(fit_image(img, (H, W)))
    grey = Image.frombytes("L", (m.shape[1], m.shape[0]), (m * 255).round().to(torch.uint8).numpy().tobytes())
    if grey.size != (W, H):
        grey = grey.resize((W, H), Image.Resampling.LANCZOS)
    g = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(1, 1, H, W).float() / 255.0
    return x, (g >= 0.5).float()


@torch.no_grad()
def fill_conditioning(pipe, x: Tensor, m: Tensor, batch: int, gens: list, sigma: float) -> tuple[Tensor, Tensor]:
    """-> (start latents (B, N, 64), img_cond (B, N, 320)) with diffusers' draws per generator: the image's VAE
    sample, the noise, the masked image's VAE sample."""
    h, w = sampling.latent_size(x.shape[-2], x.shape[-1])
    per = batch if len(gens) == 1 else 1
    starts, conds = [], []
    x, m = x.to(pipe.device, pipe.dtype), m.to(pipe.device, pipe.dtype)
    with pipe.use(pipe.ae) as ae:
        for g in gens:
            x0 = ae.encode(x, sample=True, generator=g)                                 # (1) the image
            eps = sampling.randn((per, 16, h, w), g).to(pipe.device, pipe.dtype)         # (2) the noise
            masked = ae.encode(x * (1 - m), sample=True, generator=g)                    # (3) the masked image
            starts.append(sampling.pack(sigma * eps + (1.0 - sigma) * x0))              # diffusers' scale_noise
            conds.append(torch.cat([sampling.pack(masked), pack_mask(m)], dim=-1).expand(per, -1, -1))
    return torch.cat(starts), torch.cat(conds)


def fill(pipe, image, mask, prompt: str | list[str], *, height: int | None = None, width: int | None = None,
         steps: int | None = None, guidance: float = FILL_GUIDANCE, seed: sampling.Seed = 0, num_images: int = 1,
         strength: float = 1.0, progress: bool = False, return_latents: bool = False):
    """FLUX.1 Fill: repaint the white area of `mask` in `image` as diffusers' FluxFillPipeline (see the module
    docstring). height/width: default the image's size floored to 16 (diffusers: 1024). strength < 1 starts
    from the noised image (diffusers' `strength`)."""
    require_variant(pipe, "fill", "pipe.fill")
    validate.generate_args(height, width, steps, guidance, seed, num_images)
    x, m = fill_inputs(image, mask, height, width)
    return fill_sample(pipe, x, m, prompt, steps, guidance, seed, num_images, strength, progress, return_latents)


def fill_outpaint(pipe, image, prompt: str | list[str], canvas: tuple[int, int], *, offset=None, paste: str = "fit",
                  steps: int | None = None, guidance: float = FILL_GUIDANCE, seed: sampling.Seed = 0,
                  num_images: int = 1, progress: bool = False, return_latents: bool = False):
    """Outpainting with FLUX.1 Fill: `image` pasted on a (W, H) canvas at `offset` (x, y) (default centred,
    rounded down to 16 px; paste "fit" | "clip": `regions.outpaint_canvas`, the rules of pipe.outpaint); the
    mask is the new area (white), BFL's and diffusers' Fill outpainting."""
    require_variant(pipe, "fill", "pipe.fill_outpaint")
    validate.generate_args(None, None, steps, guidance, seed, num_images)
    full, area = outpaint_canvas(image_tensor(image), canvas, offset, paste)
    return fill_sample(pipe, full[None], (1 - area)[None, None], prompt, steps, guidance, seed, num_images, 1.0,
                       progress, return_latents)


def fill_sample(pipe, x: Tensor, m: Tensor, prompt, steps, guidance, seed, num_images, strength, progress,
                return_latents):
    validate.number("strength", strength, 0.0, 1.0, lo_open=True)
    H, W = x.shape[-2:]
    steps = FILL_STEPS if steps is None else steps
    t_start = int(max(steps - min(steps * strength, steps), 0))  # diffusers' get_timesteps
    if steps - t_start < 1:
        raise ValueError(f"strength {strength} leaves no denoising step of {steps}")
    timesteps = pipe.schedule(steps, H, W)[t_start:]
    (txt, txt_ids, vec), _ = pipe.conditions(prompt, num_images)
    B = txt.shape[0]
    img, cond = fill_conditioning(pipe, x, m, B, generators(seed, B), float(timesteps[0]))
    img = pipe.denoise(img, sampling.image_ids(B, H, W, pipe.device), txt, txt_ids, vec, timesteps, guidance,
                       progress, img_cond=cond)
    return img if return_latents else pipe.decode(img, H, W)


# --------------------------------------------------------------------------------------------------- Control

def control_size(control_image, height: int | None, width: int | None) -> tuple[Image.Image, int, int]:
    """The control image and the output size: default its own size; a given size must be the image's."""
    img = to_rgb(open_image(control_image, "control image"))
    H, W = height or img.height, width or img.width
    if (H, W) != (img.height, img.width):
        raise ValueError(f"control image {getattr(control_image, 'filename', None) or control_image}: "
                         f"{img.width}x{img.height} (WxH), but the output is {W}x{H}: give a control image of the "
                         "output's size (or leave height/width out)")
    validate.image_size(H, W, what="control image ")
    return img, H, W


def control_input(pipe, control_image, height: int | None, width: int | None):
    """generate's check of the model against `control_image`: -> None (no control) or control_size(...)."""
    variant = pipe.transformer.cfg.variant
    if variant == "fill":
        raise ValueError(f"generate: {pipe.name} is a FLUX.1 fill model: use {INSTEAD['fill']}")
    if control_image is None:
        if variant == "control":
            raise ValueError(f"generate: {pipe.name} is a FLUX.1 control (Depth/Canny) model: pass control_image= "
                             "(--control IMG), a depth or edge map")
        return None
    if variant != "control":
        raise ValueError(f"control_image needs a FLUX.1 control model (Depth/Canny, or dev + BFL's control LoRA); "
                         f"{pipe.name} is a FLUX.1 {variant} model")
    return control_size(control_image, height, width)


@torch.no_grad()
def control_conditioning(pipe, img: Image.Image, batch: int, gens: list) -> Tensor:
    """-> img_cond (B, N, 64): the control image's VAE posterior sample, one draw for the whole batch from one
    generator (diffusers repeats the image to the batch, then samples), or one per image's generator."""
    x = pil_to_tensor(img).to(pipe.device, pipe.dtype)
    with pipe.use(pipe.ae) as ae:
        if len(gens) == 1:
            return sampling.pack(ae.encode(x.expand(batch, -1, -1, -1), sample=True, generator=gens[0]))
        return torch.cat([sampling.pack(ae.encode(x, sample=True, generator=g)) for g in gens])


# --------------------------------------------------------------------------------------------------- Kontext

def kontext_reference_size(width: int, height: int, auto_resize: bool = True) -> tuple[int, int]:
    """A reference's (W, H) -> its size for Kontext: floored to 16, then (auto_resize) the preferred resolution
    with the closest aspect ratio (ties: the smaller width, as Python's min over (diff, w, h) tuples)."""
    w, h = width // 16 * 16, height // 16 * 16
    if w < 16 or h < 16:
        raise ValueError(f"a {width}x{height} reference is too small for Kontext (16 px at least)")
    if auto_resize:
        _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def kontext_output_size(height: int, width: int, max_area: int = KONTEXT_MAX_AREA) -> tuple[int, int]:
    """diffusers' FluxKontextPipeline: the requested size rescaled to ~max_area pixels at its aspect ratio,
    floored to multiples of 16 -> (H, W)."""
    aspect = width / height
    w, h = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return h // 16 * 16, w // 16 * 16


def kontext_ids(grids: list[tuple[int, int]], device=None) -> Tensor:
    """(M, 3) RoPE ids of the references' tokens (grids: each one's (rows, cols) of tokens), ComfyUI's "offset"
    placement: index 1; each reference goes right of the ones before (w_offset = the union's width) if its
    height plus the union's height exceeds its width plus the union's width, else below (h_offset). One
    reference: (1, row, col), as diffusers and BFL."""
    out, H, W = [], 0, 0
    for rows, cols in grids:
        dy, dx = (0, W) if rows + H > cols + W else (H, 0)
        H, W = max(H, rows + dy), max(W, cols + dx)
        ids = torch.zeros(rows, cols, 3, device=device)
        ids[..., 0] = 1
        ids[..., 1] = torch.arange(rows, device=device)[:, None] + dy
        ids[..., 2] = torch.arange(cols, device=device)[None, :] + dx
        out.append(ids.reshape(-1, 3))
    return torch.cat(out)


def kontext_references(pipe, images, auto_resize: bool = True) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """-> (packed reference latents (1, M, 64) = VAE means, their ids (1, M, 3), the first one's (H, W))."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("kontext needs at least one reference image")
    latents, grids = [], []
    for i, src in enumerate(images):
        img = to_rgb(open_image(src, f"reference image {i + 1}"))
        w, h = kontext_reference_size(img.width, img.height, auto_resize)
        latents.append(pipe.encode_image(pil_to_tensor(fit_image(img, (h, w)))))  # Lanczos, as diffusers
        grids.append((h // 16, w // 16))
    return torch.cat(latents, dim=1), kontext_ids(grids, pipe.device)[None], (grids[0][0] * 16, grids[0][1] * 16)


def kontext(pipe, image, prompt: str | list[str], *, height: int | None = None, width: int | None = None,
            steps: int | None = None, guidance: float | None = None, seed: sampling.Seed = 0, num_images: int = 1,
            max_area: int = KONTEXT_MAX_AREA, auto_resize: bool = True, negative_prompt=None,
            true_cfg_scale: float = 1.0, progress: bool = False, return_latents: bool = False):
    """FLUX.1 Kontext: edit `image` (a path / PIL image, or a list of them: several references) by `prompt`, as
    diffusers' FluxKontextPipeline for one reference (see the module docstring for sizes and defaults).
    guidance None: 2.5 (BFL); steps None: 28. negative_prompt + true_cfg_scale > 1: true CFG, as diffusers."""
    require_variant(pipe, "kontext", "pipe.kontext")
    validate.generate_args(height, width, steps, KONTEXT_GUIDANCE if guidance is None else guidance, seed,
                           num_images, true_cfg_scale=true_cfg_scale)
    validate.integer("max_area", max_area, 256, 4096 ** 2)
    ref, ref_ids, (h0, w0) = kontext_references(pipe, image, auto_resize)
    if height is None and width is None:
        H, W = h0, w0                       # BFL: the reference's (preferred) resolution
    else:
        H, W = kontext_output_size(height or h0, width or w0, max_area)
    validate.image_size(H, W, num_images)
    (txt, txt_ids, vec), negative = pipe.conditions(prompt, num_images, negative_prompt, true_cfg_scale)
    B = txt.shape[0]
    img = sampling.noise(B, H, W, seed, pipe.device, pipe.dtype)  # the first draw: the references took means
    img = pipe.denoise(img, sampling.image_ids(B, H, W, pipe.device), txt, txt_ids, vec, pipe.schedule(
        KONTEXT_STEPS if steps is None else steps, H, W), KONTEXT_GUIDANCE if guidance is None else guidance,
        progress, negative, true_cfg_scale, img_cond_seq=ref.expand(B, -1, -1),
        img_cond_seq_ids=ref_ids.expand(B, -1, -1))
    return img if return_latents else pipe.decode(img, H, W)


# ------------------------------------------------------------------------------------- FreeCus on the family

@torch.no_grad()
def freecus_conditioning(pipe, reference: Tensor, batch: int, seed, *, image=None, mask=None,
                         control_image=None, reference_control=None) -> tuple[Tensor | None, Tensor | None, object]:
    """The channel conditioning of FreeCus on a Fill or control model -> (the reference item's (1, N, C), the
    targets' (B, N, C), a function that finishes the targets' latents).
    Fill (FreeCus §4.4, Fig. 8c): the reference branch gets the reference with an ALL-BLACK mask (nothing to
    repaint: it reconstructs the reference); the targets get the scene `image` with the region `mask`. Both
    are encoded with the VAE posterior mean (no draw: FreeCus' noise stays its only draw), and the targets'
    tokens wholly outside the region are pasted back from the scene's latents at the end, so attention sharing
    changes the inpainted region only.
    Control: the targets get `control_image`; the reference gets `reference_control` (its own depth/edge map)
    or, if none, the same control image. The paper gives no more detail and the authors' code has no Fill or
    Depth code (github.com/Monalissaa/FreeCus: FluxPipeline only); these choices are minidit's."""
    variant = pipe.transformer.cfg.variant
    H, W = reference.shape[-2:]
    if variant == "fill":
        if image is None or mask is None:
            raise ValueError("FreeCus on a FLUX.1 Fill model needs the scene image= and the region mask=")
        x, m = fill_inputs(image, mask, H, W)
        black = torch.zeros_like(m)  # the reference pass: nothing to repaint
        ref_cond = torch.cat([pipe.encode_image(reference[None]), pack_mask(black).to(pipe.device, pipe.dtype)], -1)
        cond = torch.cat([pipe.encode_image(x * (1 - m)), pack_mask(m).to(pipe.device, pipe.dtype)], -1)
        scene, keep = pipe.encode_image(x), token_mask(1 - m[0, 0], threshold=1.0).flatten()

        def finish(img: Tensor) -> Tensor:
            return torch.where(keep.to(img.device)[None, :, None], scene.to(img), img)
        return ref_cond, cond.expand(batch, -1, -1), finish
    if image is not None or mask is not None:
        raise ValueError(f"image= and mask= are FreeCus-on-Fill inputs; {pipe.name} is a FLUX.1 {variant} model")
    if variant == "control":
        if control_image is None:
            raise ValueError("FreeCus on a FLUX.1 control model needs control_image= (a depth or edge map)")
        gen = [torch.Generator("cpu").manual_seed(int(seed))]
        img = control_size(control_image, H, W)[0]
        cond = control_conditioning(pipe, img, 1, gen)
        ref_img = img if reference_control is None else control_size(reference_control, H, W)[0]
        ref_cond = cond if reference_control is None else control_conditioning(pipe, ref_img, 1, gen)
        return ref_cond, cond.expand(batch, -1, -1), lambda img: img
    if control_image is not None or reference_control is not None:
        raise ValueError(f"control_image= needs a FLUX.1 control model; {pipe.name} is a FLUX.1 {variant} model")
    return None, None, lambda img: img

