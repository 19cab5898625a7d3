"""Text-to-image with FLUX.1: prompt -> (T5 states, CLIP vector) -> Euler flow matching -> autoencoder -> PIL.

    pipe = Pipeline.load()                                   # the built-in tiny checkpoint (random weights: noise)
    pipe = Pipeline.load("black-forest-labs/FLUX.1-dev")     # from the local Hugging Face cache, offline
    pipe = Pipeline.load("/models/FLUX.1-schnell", offload=True)
    images = pipe.generate("a photo of a cat", height=1024, width=1024, seed=0)

The pieces are public so research code can reuse them: `encode_prompt`, `denoise`, `decode`, and the
personalization methods (personalize.py, freecus.py) are built from exactly these.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import sampling
from .autoencoder import AutoEncoder, load_autoencoder
from .image import tensor_to_pil
from .loading import CheckpointError
from .text_encoder import TextEncoder
from .transformer import Flux, find_transformer, load_transformer

DEFAULT_STEPS = {"dev": 28, "schnell": 4}
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}


# ------------------------------------------------------------------------------------------- finding weights

def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloads (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return dirs


def resolve_weights(path: str | Path) -> Path:
    """A local folder, a Hugging Face cache folder `models--org--name`, or a repo name `org/name` looked up
    offline in the local cache (the snapshot `refs/main` points to, else the newest). Never downloads."""
    p = Path(path).expanduser()
    if p.exists():
        return _snapshot(p) if p.name.startswith("models--") else p
    if "/" in str(path) and not str(path).startswith(("/", ".")) and len(str(path).split("/")) == 2:
        name = "models--" + str(path).replace("/", "--")
        for d in hf_cache_dirs():
            if (d / name).is_dir():
                return _snapshot(d / name)
        raise CheckpointError(f"{path!r} is not in the local Hugging Face cache (looked in "
                              f"{', '.join(str(d) for d in hf_cache_dirs())}); minidit never downloads: "
                              f"run `huggingface-cli download {path}` or pass a folder")
    raise CheckpointError(f"weights not found: {path}")


def _snapshot(repo: Path) -> Path:
    ref = repo / "refs" / "main"
    if ref.exists() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snaps = sorted((repo / "snapshots").glob("*"), key=lambda s: s.stat().st_mtime) if (repo / "snapshots").is_dir() else []
    if not snaps:
        raise CheckpointError(f"{repo} has no snapshots")
    return snaps[-1]


@dataclass
class WeightPaths:
    """Where each component comes from; any field may be set explicitly."""
    transformer: Path
    ae: Path
    text_encoder: Path       # CLIP
    text_encoder_2: Path     # T5
    tokenizer: Path          # CLIP vocab.json + merges.txt
    tokenizer_2: Path        # T5 tokenizer.json or spiece.model

    @staticmethod
    def find(root: Path, **overrides) -> "WeightPaths":
        root = Path(root)
        found = dict(
            transformer=find_transformer(root) or root / "transformer",
            ae=root / "ae.safetensors" if (root / "ae.safetensors").exists() else root / "vae",
            text_encoder=root / "text_encoder", text_encoder_2=root / "text_encoder_2",
            tokenizer=root / "tokenizer", tokenizer_2=root / "tokenizer_2")
        unknown = sorted(set(overrides) - set(found))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; the components are {sorted(found)}")
        for k, v in overrides.items():  # a relative override is looked up in the root first, then as given
            if v is not None:
                found[k] = root / v if not Path(v).is_absolute() and (root / v).exists() else Path(v)
        missing = [f"{k} ({v})" for k, v in found.items() if not v.exists()]
        if missing:
            raise CheckpointError(f"weights incomplete in {root}: missing {', '.join(missing)}. Expected a FLUX.1 "
                                  "repository: flux1-*.safetensors (or transformer/), ae.safetensors (or vae/), "
                                  "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/")
        return WeightPaths(**found)


# ------------------------------------------------------------------------------------------------- pipeline

class Pipeline:
    def __init__(self, transformer: Flux, ae: AutoEncoder, text: TextEncoder, device: torch.device,
                 dtype: torch.dtype, offload: bool = False, name: str = "flux"):
        self.transformer, self.ae, self.text = transformer, ae, text
        self.device, self.dtype, self.offload, self.name = device, dtype, offload, name
        self.variant = "dev" if transformer.cfg.guidance_embed else "schnell"

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, offload: bool = False, **files) -> "Pipeline":
        """path: FLUX.1-dev/schnell folder (BFL files at the root or diffusers subfolders), a Hugging Face cache
        folder or repo name (offline), or None for the built-in tiny checkpoint. `files` overrides single
        components: transformer=, ae=, text_encoder=, text_encoder_2=, tokenizer=, tokenizer_2=.
        device: default CUDA if available; dtype: bf16 on GPU, fp32 on CPU. offload=True keeps every component
        on the CPU and moves one at a time to the GPU while it runs."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        if path is None:
            from .weights.tiny import tiny_repo
            root, name = tiny_repo(), "minidit-tiny (random weights)"
        else:
            root, name = resolve_weights(path), str(path)
        paths = WeightPaths.find(root, **files)
        home = torch.device("cpu") if offload else device
        transformer = load_transformer(paths.transformer, home, dtype)
        variant = "dev" if transformer.cfg.guidance_embed else "schnell"
        text_dtype = torch.float32 if dtype == torch.float16 else dtype  # T5 overflows in fp16
        text = TextEncoder.load(root, device=home, dtype=text_dtype, max_length=T5_MAX_LENGTH[variant],
                                clip=paths.text_encoder, t5=paths.text_encoder_2,
                                clip_tokenizer=paths.tokenizer, t5_tokenizer=paths.tokenizer_2)
        ae = load_autoencoder(paths.ae, home, dtype)
        return cls(transformer, ae, text, device, dtype, offload, name)

    @contextlib.contextmanager
    def _use(self, module):
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
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        with self._use(self.text):
            txt, vec = self.text.encode(prompts)
        txt, vec = txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)
        return txt, sampling.text_ids(txt.shape[0], txt.shape[1], self.device), vec

    def denoise(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor, timesteps: Tensor,
                guidance: float | None = 3.5, progress: bool = False) -> Tensor:
        with self._use(self.transformer) as model:
            return sampling.denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance, progress)

    @torch.no_grad()
    def decode(self, img: Tensor, height: int, width: int, tile: int | None = None) -> list:
        """Packed latent tokens (B, N, 64) -> PIL images."""
        with self._use(self.ae) as ae:
            x = ae.decode(sampling.unpack(img.to(self.device, self.dtype), height, width), tile=tile)
        return tensor_to_pil(x.float())

    @torch.no_grad()
    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> packed normalised latent tokens (B, N, 64) (deterministic: the mean)."""
        with self._use(self.ae) as ae:
            return sampling.pack(ae.encode(image.to(self.device, self.dtype)))

    def schedule(self, steps: int | None, height: int, width: int) -> Tensor:
        steps = DEFAULT_STEPS[self.variant] if steps is None else steps
        h, w = sampling.latent_size(height, width)
        return sampling.get_schedule(steps, (h // 2) * (w // 2), shift=self.variant == "dev")

    # -- text to image ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], height: int = 1024, width: int = 1024, steps: int | None = None,
                 guidance: float = 3.5, seed: int | list[int] = 0, num_images: int = 1, progress: bool = False,
                 return_latents: bool = False):
        """Returns `num_images` PIL images per prompt. seed: an int draws the whole batch's noise from one
        generator (diffusers-identical); a list gives image i its own seed (reproducible alone)."""
        sampling.latent_size(height, width)  # validates the resolution before any work
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images)]
        txt, txt_ids, vec = self.encode_prompt(prompts)
        B = len(prompts)
        img = sampling.noise(B, height, width, seed, self.device, self.dtype)
        img = self.denoise(img, sampling.image_ids(B, height, width, self.device), txt, txt_ids, vec,
                           self.schedule(steps, height, width), guidance, progress)
        return img if return_latents else self.decode(img, height, width)

    # -- personalization (the methods live in personalize.py and freecus.py; these are their entry points) ------
    def invert(self, image, prompt: str = "", **kw):
        """Invert a reference image along the flow schedule (Personalize Anything's reference branch)."""
        from .personalize import invert
        return invert(self, image, prompt, **kw)

    def personalize(self, prompt, reference, **kw):
        """Personalize Anything: subject from `reference` (one Reference or a list) placed into a new image."""
        from .personalize import personalize
        return personalize(self, prompt, reference, **kw)

    def inpaint(self, image, mask, prompt, **kw):
        from .personalize import inpaint
        return inpaint(self, image, mask, prompt, **kw)

    def outpaint(self, image, prompt, canvas, **kw):
        from .personalize import outpaint
        return outpaint(self, image, prompt, canvas, **kw)

    def freecus(self, prompt, reference, **kw):
        """FreeCus: pivotal attention sharing with the reference on vital layers."""
        from .freecus import freecus
        return freecus(self, prompt, reference, **kw)
