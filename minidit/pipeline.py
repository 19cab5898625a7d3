"""Text-to-image with FLUX.1: prompt -> (T5 states, CLIP vector) -> Euler flow matching -> autoencoder -> PIL.

    pipe = Pipeline.load()                                   # the built-in tiny model (trained on weights/world.py)
    pipe.defaults                                            # its recommended size, steps, true CFG (minidit.json)
    pipe = Pipeline.load("black-forest-labs/FLUX.1-dev")     # from the local Hugging Face cache, offline
    pipe = Pipeline.load("/models/FLUX.1-schnell", offload=True)
    images = pipe.generate("a photo of a cat", seed=0)       # every value not given: the model's (pipe.defaults)
    images = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images   # diffusers-shaped
    images = pipe.img2img("photo.png", "the same photo as a watercolour", strength=0.6)

The pieces are public so research code can reuse them: `encode_prompt`, `denoise`, `decode`, and the
personalization methods (personalize.py, freecus.py) are built from exactly these.

Defaults belong to the model: every entry point (generate, __call__, img2img, personalize, inpaint, outpaint,
freecus) takes a size, steps, guidance, true CFG scale or negative prompt left as None from `pipe.defaults`,
read from the model folder's `minidit.json` (defaults.py); without one, FLUX.1's as diffusers has them (1024 x
1024, 28 steps for dev / 4 for schnell, guidance 3.5, no true CFG). The built-in model's file says 256 x 256,
28 steps and true CFG 4 with the empty negative prompt (it has no guidance embedding), so
`Pipeline.load().generate(prompt, seed=1)` draws what `minidit generate --prompt PROMPT --seed 1` draws.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import attention, family, freecus as fc, inversion, personalize as pa, sampling, validate
from .autoencoder import AutoEncoder, load_autoencoder
from .defaults import ModelDefaults
from .image import load_image, open_image, pil_to_tensor, tensor_to_pil, to_rgb
from .loading import default_device_dtype
from .repository import BUILTIN_NAME, WeightPaths, builtin_repo, read_schedule, resolve_weights
from .text_encoder import TextEncoder, tokenizer_max_length
from .flux_loading import load_transformer
from .transformer import Flux

DEFAULT_STEPS = {"dev": 28, "schnell": 4}  # Pipeline.default_steps: 4 only for an unshifted schedule (schnell)
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class FluxOutput:
    """What `Pipeline.__call__` returns, as diffusers' FluxPipelineOutput: `.images` is a list of PIL images
    (output_type "pil"), a (B, H, W, 3) float array in [0, 1] ("np"), a (B, 3, H, W) float tensor in [0, 1] ("pt")
    or the packed latents (B, N, 64) ("latent")."""
    images: list | Tensor


# ------------------------------------------------------------------------------------------------- pipeline

class Pipeline:
    def __init__(self, transformer: Flux, ae: AutoEncoder, text: TextEncoder, device: torch.device,
                 dtype: torch.dtype, offload: bool = False, name: str = "flux",
                 flow_schedule: sampling.FlowSchedule | None = None, defaults: ModelDefaults | None = None):
        self.transformer, self.ae, self.text = transformer, ae, text
        self.defaults = defaults or ModelDefaults()  # the model's recommended settings (its minidit.json)
        self.device, self.dtype, self.offload, self.name = device, dtype, offload, name
        self.variant = "dev" if transformer.cfg.guidance_embed else "schnell"  # dev iff guidance-distilled
        self.flow_schedule = flow_schedule or sampling.FlowSchedule(dynamic=transformer.cfg.guidance_embed)

    @property
    def default_steps(self) -> int:
        """The model's (`defaults.steps`, its minidit.json) if it states them, else 4 for a schnell (no guidance
        embedding) with an unshifted schedule and 28 otherwise."""
        if self.defaults.steps is not None:
            return self.defaults.steps
        return DEFAULT_STEPS["schnell" if self.variant == "schnell" and not self.flow_schedule.shifting else "dev"]

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, offload: bool = False, loras=(), **files) -> "Pipeline":
        """path: FLUX.1-dev/schnell folder (BFL files at the root or diffusers subfolders), a Hugging Face cache
        folder or repo name (offline), or None for the built-in tiny checkpoint. `files` overrides single
        components: transformer=, ae=, text_encoder=, text_encoder_2=, tokenizer=, tokenizer_2=.
        device: default CUDA if available; dtype: bf16 on GPU, fp32 on CPU. offload=True keeps every component
        on the CPU and moves one at a time to the GPU while it runs. loras: [(path, scale), ...] merged into the
        transformer as it loads (minidit.lora; a BFL Depth/Canny LoRA makes dev a control model)."""
        attention.check_backend()  # MINIDIT_ATTENTION: a named error now, not a ModuleNotFoundError mid-run
        device, dtype = default_device_dtype(device, dtype)
        if path is None:
            root, name = builtin_repo(), BUILTIN_NAME
        else:
            root, name = resolve_weights(path), str(path)
        paths = WeightPaths.find(root, **files)
        home = torch.device("cpu") if offload else device
        # a diffusers repository's own transformer/ is loaded through its root, whose model_index.json tells
        # FLUX.1 Kontext (dev's shapes) apart (flux_loading.open_transformer)
        own = "transformer" not in files and paths.transformer == root / "transformer"
        transformer = load_transformer(root if own else paths.transformer, home, dtype, loras=loras)
        variant = "dev" if transformer.cfg.guidance_embed else "schnell"
        text_dtype = torch.float32 if dtype == torch.float16 else dtype  # T5 overflows in fp16
        # T5 length: FLUX's 512 (dev) / 256 (schnell), or less when the tokenizer says so (the tiny trained model)
        t5_length = min(T5_MAX_LENGTH[variant], tokenizer_max_length(paths.tokenizer_2) or 512)
        text = TextEncoder.load(root, device=home, dtype=text_dtype, max_length=t5_length,
                                clip=paths.text_encoder, t5=paths.text_encoder_2,
                                clip_tokenizer=paths.tokenizer, t5_tokenizer=paths.tokenizer_2)
        ae = load_autoencoder(paths.ae, home, dtype)
        return cls(transformer, ae, text, device, dtype, offload, name,
                   read_schedule(root, transformer.cfg.guidance_embed), ModelDefaults.read(root))

    @contextlib.contextmanager
    def use(self, module):
        """With offload: move one component to the GPU for the duration of the block, then back to the CPU."""
        if not self.offload:
            yield module
            return
        # keep the CPU tensors (memory-mapped from the checkpoint when no cast was needed) and only drop the
        # GPU copies afterwards: weights never change, so nothing is copied back
        params = [p for m in ([module.t5, module.clip] if isinstance(module, TextEncoder) else [module])
                  for p in m.parameters()]
        on_cpu = [p.data for p in params]
        for p in params:
            p.data = p.data.to(self.device, non_blocking=True)
        try:
            yield module
        finally:
            for p, data in zip(params, on_cpu):
                p.data = data
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    # -- the pieces -------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: str | list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """-> txt (B, L, 4096), txt_ids (B, L, 3), vec (B, 768) on the pipeline device and dtype."""
        prompts = validate.prompts("prompt", prompts)
        with self.use(self.text):
            txt, vec = self.text.encode(prompts)
        txt, vec = txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)
        return txt, sampling.text_ids(txt.shape[0], txt.shape[1], self.device), vec

    def conditions(self, prompt: str | list[str], num_images: int = 1, negative_prompt: str | list[str] | None = None,
                   true_cfg_scale: float = 1.0) -> tuple[tuple[Tensor, Tensor, Tensor], tuple | None]:
        """-> (txt, txt_ids, vec) with each prompt repeated `num_images` times (as diffusers), and the same for
        the negative prompt when true CFG is on (diffusers' rule: true_cfg_scale > 1 and a negative prompt,
        "" included), else None. A single negative prompt applies to every prompt."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        prompts = validate.prompts("prompt", prompt)
        if negative_prompt is not None:
            validate.prompts("negative_prompt", negative_prompt)
        cond = self.encode_prompt([p for p in prompts for _ in range(num_images)])
        if not (float(true_cfg_scale) > 1 and negative_prompt is not None):
            return cond, None
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise ValueError(f"negative_prompt: got {len(negs)} negative prompts for {len(prompts)} prompts "
                             "(give one for all, or one per prompt)")
        return cond, self.encode_prompt([n for n in negs for _ in range(num_images)])

    def denoise(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: Tensor,
                guidance: float | None = 3.5, progress: bool = False, negative: tuple | None = None,
                true_cfg_scale: float = 1.0, **conditioning) -> Tensor:
        """sampling.denoise with this pipeline's transformer; `conditioning`: img_cond / img_cond_seq /
        img_cond_seq_ids of the FLUX.1 family (family.py)."""
        with self.use(self.transformer) as model:
            return sampling.denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance, progress,
                                    negative, true_cfg_scale, **conditioning)

    @torch.no_grad()
    def decode_pixels(self, img: Tensor, height: int, width: int, tile: int | None = None) -> Tensor:
        """Packed latent tokens (B, N, 64) -> images (B, 3, H, W), nominally in [-1, 1], not clamped."""
        validate.finite_tensor("latents", img)  # NaN/Inf is an error, never a black picture
        with self.use(self.ae) as ae:
            return ae.decode(sampling.unpack(img.to(self.device, self.dtype), height, width), tile=tile)

    def decode(self, img: Tensor, height: int, width: int, tile: int | None = None) -> list:
        """Packed latent tokens (B, N, 64) -> PIL images."""
        return tensor_to_pil(self.decode_pixels(img, height, width, tile).float())

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> packed normalised latent tokens (B, N, 64) (deterministic: the mean)."""
        with self.use(self.ae) as ae:
            return sampling.pack(ae.encode(image.to(self.device, self.dtype)))

    @torch.no_grad()
    def encode_reference(self, images: Tensor, sample: bool = False, seed: int = 0) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> packed latents (B, N, 64) of reference images: the VAE posterior mean, or with
        `sample` one posterior sample per image drawn in order from `torch.Generator("cpu").manual_seed(seed)`
        (both methods' released code samples it)."""
        if not sample:
            return self.encode_image(images)
        g = torch.Generator("cpu").manual_seed(int(seed))
        with self.use(self.ae) as ae:
            return sampling.pack(ae.encode(images.to(self.device, self.dtype), sample=True, generator=g))

    def with_defaults(self, height=None, width=None, guidance=None, negative_prompt=None, true_cfg_scale=None,
                      image_input: bool = False):
        """The arguments every sampling entry point shares, each left None replaced by the model's (`defaults`):
        -> (height, width, guidance, negative_prompt, true_cfg_scale). True CFG stays off with true_cfg_scale=1
        (or for a model without a negative prompt, as FLUX.1, with none given: diffusers' rule). image_input: a
        command with an input image, whose size a model that states none (FLUX.1) keeps (height/width stay None)."""
        d = self.defaults
        height, width = d.size(height, width, (None, None)) if image_input else d.size(height, width)
        negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
        true_cfg_scale = d.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        return height, width, d.guidance if guidance is None else guidance, negative_prompt, true_cfg_scale

    def schedule(self, steps: int | None, height: int, width: int) -> Tensor:
        """steps + 1 timesteps 1 -> 0 for this size, shifted per `flow_schedule` (the scheduler config). Every
        sampling entry point comes here with its final size: a size far from the model's training warns here."""
        steps = self.default_steps if steps is None else steps
        if (far := self.defaults.size_warning(height, width)) is not None:
            warnings.warn(far, stacklevel=3)
        h, w = sampling.latent_size(height, width)
        return self.flow_schedule.timesteps(steps, (h // 2) * (w // 2))

    # -- text to image ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, seed: sampling.Seed = 0,
                 num_images: int = 1, progress: bool = False, return_latents: bool = False,
                 negative_prompt: str | list[str] | None = None, true_cfg_scale: float | None = None,
                 latents: Tensor | None = None, control_image=None):
        """Returns `num_images` PIL images per prompt (or the packed latents). seed: an int draws the whole
        batch's noise from one generator (diffusers-identical); a list gives image i its own seed (reproducible
        alone); torch.Generator(s) are used as diffusers' `generator=`. negative_prompt + true_cfg_scale > 1:
        true classifier-free guidance (two forwards per step), as diffusers' FluxPipeline. latents: packed
        initial noise (B, N, 64) instead of drawing it. None: the model's value (`self.defaults`).
        control_image: the depth/edge map of a FLUX.1 control model (Depth/Canny, or dev + a control LoRA), at the
        output size (default size: its own); one VAE sample for the batch, drawn before the noise (family.py)."""
        control = family.control_input(self, control_image, height, width)
        if control is not None:
            control, height, width = control
        height, width, guidance, negative_prompt, true_cfg_scale = self.with_defaults(height, width, guidance,
                                                                             negative_prompt, true_cfg_scale)
        validate.generate_args(height, width, steps, guidance, seed, num_images, true_cfg_scale=true_cfg_scale)
        (txt, txt_ids, vec), negative = self.conditions(prompt, num_images, negative_prompt, true_cfg_scale)
        B, N = txt.shape[0], (height // 16) * (width // 16)
        gens = family.generators(seed, B)
        cond = None if control is None else family.control_conditioning(self, control, B, gens)
        if latents is None:
            img = sampling.noise(B, height, width, gens if isinstance(seed, (list, tuple)) else gens[0], self.device,
                                 self.dtype)
        elif tuple(latents.shape) != (B, N, 64):
            raise ValueError(f"latents must be packed noise of shape {(B, N, 64)} for {B} images of {width}x{height}, "
                             f"got {tuple(latents.shape)}")
        else:
            img = validate.finite_tensor("latents", latents).to(self.device, self.dtype)
        img = self.denoise(img, sampling.image_ids(B, height, width, self.device), txt, txt_ids, vec,
                           self.schedule(steps, height, width), guidance, progress, negative, true_cfg_scale,
                           img_cond=cond)
        return img if return_latents else self.decode(img, height, width)

    def __call__(self, prompt: str | list[str], height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", negative_prompt: str | list[str] | None = None,
                 true_cfg_scale: float | None = None, latents: Tensor | None = None,
                 progress: bool = False) -> FluxOutput:
        """diffusers' FluxPipeline call: the same arguments mean the same, and the same generator gives the same
        images. Differences: every value not given is the model's (`self.defaults`: diffusers' for FLUX.1, except
        the steps follow the checkpoint, 4 schnell and 28 dev), and T5's length is the pipeline's (512 dev, 256
        schnell: pass max_sequence_length=256 to diffusers for schnell)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        height, width = self.defaults.size(height, width)
        if generator is None:  # diffusers draws from torch's global generator: so does this seed
            generator = int(torch.randint(0, 2 ** 62, ()))
        img = self.generate(prompt, height, width, num_inference_steps, guidance_scale, generator,
                            num_images_per_prompt, progress, True, negative_prompt, true_cfg_scale, latents)
        return FluxOutput(self.to_output(img, height, width, output_type))

    def to_output(self, img: Tensor, height: int, width: int, output_type: str = "pil"):
        """Packed latents -> diffusers' output types (see FluxOutput)."""
        if output_type == "latent":
            return img
        x = self.decode_pixels(img, height, width).float()
        if output_type == "pil":
            return tensor_to_pil(x)
        x = (x / 2 + 0.5).clamp(0, 1)  # diffusers' postprocess
        return x.cpu().permute(0, 2, 3, 1).numpy() if output_type == "np" else x

    # -- image to image -----------------------------------------------------------------------------------------
    @family.base_model_only
    def img2img(self, image, prompt: str | list[str], strength: float = 0.6, height: int | None = None,
                width: int | None = None, steps: int | None = None, guidance: float | None = None,
                seed: sampling.Seed = 0, num_images: int = 1, negative_prompt: str | list[str] | None = None,
                true_cfg_scale: float | None = None, progress: bool = False, return_latents: bool = False):
        """Image to image as diffusers' FluxImg2ImgPipeline: of the schedule for `steps` only the steps from
        t_start = int(steps - strength·steps) on run; the image's latent is a posterior SAMPLE drawn from the
        seed's generator, then the noise from the same generator, and the start is σ·noise + (1 - σ)·latent at
        the first kept step (scale_noise). strength 1: from pure noise; small: close to the image.
        image: a path or PIL image, resized (Lanczos) to height x width; default: the model's size (`self.defaults`,
        its minidit.json), or for a model that states none (FLUX.1) the image's own size rounded down to multiples
        of 16; every other value left None: the model's. A seed list gives every image its own posterior sample
        and noise (as diffusers with one generator per copy of the image)."""
        validate.number("strength", strength, 0.0, 1.0)
        height, width, guidance, negative_prompt, true_cfg_scale = self.with_defaults(
            height, width, guidance, negative_prompt, true_cfg_scale, image_input=True)
        validate.generate_args(height, width, steps, guidance, seed, num_images, true_cfg_scale=true_cfg_scale)
        image = to_rgb(open_image(image, "image"))  # the exact reader: EXIF orientation, 16-bit grey scaled
        height, width = height or image.height // 16 * 16, width or image.width // 16 * 16
        sampling.latent_size(height, width)
        steps = self.default_steps if steps is None else steps
        t_start = int(max(steps - min(steps * strength, steps), 0))
        if steps - t_start < 1:
            raise ValueError(f"strength {strength} leaves no denoising step of {steps} (use strength > 0)")
        timesteps = self.schedule(steps, height, width)[t_start:]
        (txt, txt_ids, vec), negative = self.conditions(prompt, num_images, negative_prompt, true_cfg_scale)
        B = txt.shape[0]
        gen = sampling.generator(seed, B)
        x = pil_to_tensor(load_image(image, (height, width))).to(self.device, self.dtype)  # Lanczos, as diffusers
        with torch.no_grad(), self.use(self.ae) as ae:
            if isinstance(gen, list):
                x0 = torch.cat([ae.encode(x, sample=True, generator=g) for g in gen])
            else:
                x0 = ae.encode(x, sample=True, generator=gen).expand(B, -1, -1, -1)
        eps = sampling.randn(tuple(x0.shape), gen).to(self.device, self.dtype)
        sigma = timesteps[0].to(self.device, self.dtype)
        img = sampling.pack(sigma * eps + (1.0 - sigma) * x0)  # diffusers' scale_noise
        img = self.denoise(img, sampling.image_ids(B, height, width, self.device), txt, txt_ids, vec, timesteps,
                           guidance, progress, negative, true_cfg_scale)
        return img if return_latents else self.decode(img, height, width)

    # -- personalization (the methods live in personalize.py and freecus.py; these are their entry points) ------
    # The module functions themselves, so `pipe.personalize` has their full, explicit signature and docstring.
    # On a Fill or control model the 64-channel methods are refused up front (family.base_model_only).
    invert = family.base_model_only(inversion.invert)    # invert a reference (Personalize Anything's branch)
    personalize = family.base_model_only(pa.personalize)  # Personalize Anything: subject(s) in a new image
    inpaint = family.base_model_only(pa.inpaint)          # repaint a masked region, keep the rest
    outpaint = family.base_model_only(pa.outpaint)        # extend an image to a larger canvas
    freecus = fc.freecus                      # FreeCus: pivotal attention sharing (also on Fill and control)

    # -- the FLUX.1 family (family.py) --------------------------------------------------------------------------
    fill = family.fill                        # FLUX.1 Fill: inpainting (white mask = repaint)
    fill_outpaint = family.fill_outpaint      # FLUX.1 Fill: outpainting on a larger canvas
    kontext = family.kontext                  # FLUX.1 Kontext: edit one or several reference images
