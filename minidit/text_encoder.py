"""Loading the two text encoders and turning prompts into FLUX's conditioning.

    te = TextEncoder.load("FLUX.1-dev", device="cuda", dtype=torch.bfloat16)   # reads the 4 text folders
    txt, vec = te.encode(["a photo of a cat"])      # (B, 512, 4096) T5 states, (B, 768) CLIP pooled

`encode` equals diffusers' `FluxPipeline.encode_prompt`: CLIP gets the prompt padded to 77 with the end token
and gives its pooled output; T5 gets it padded to max_length (512 for dev, 256 for schnell) with NO attention
mask, so the pad tokens are attended to, exactly as FLUX was trained. txt has T5's dtype, vec CLIP's dtype.

`load_t5` / `load_clip` build the model on the meta device and stream the safetensors into it tensor by tensor
(minidit.loading), strict on key names and shapes. Accepted key layouts beyond the plain one:
  T5:   the tied `encoder.embed_tokens.weight` some files carry next to `shared.weight` (dropped when equal,
        used as `shared.weight` when that is absent);
  CLIP: the `text_model.embeddings.position_ids` buffer of older files (ignored), and the un-prefixed
        `embeddings...`/`encoder...` names transformers >= 5 writes (read as `text_model....`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .clip import CLIPTextConfig, CLIPTextEncoder
from .loading import (CheckpointError, check_config, default_device_dtype, load_streaming, open_checkpoint, read_json,
                      tensor_shape)
from .t5 import T5Config, T5Encoder
from .tokenizer import CLIPTokenizer, T5Tokenizer


class _KeyView(Mapping):
    """`{model_key: sd[checkpoint_key]}`: renames and hides checkpoint keys without reading tensors."""

    def __init__(self, sd: Mapping, keys: dict[str, str]):
        self.sd, self.keys = sd, keys

    def __getitem__(self, key: str) -> Tensor:
        return self.sd[self.keys[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tensor_shape(self.sd, self.keys[key])

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _read_config(path: Path, config, cls, what: str):
    """A config object from `config` (an instance, a config.json dict, or a path) or from path/config.json."""
    if isinstance(config, cls):
        return config
    if isinstance(config, Mapping):
        return cls.from_hf(dict(config))
    file = Path(config) if config is not None else (path / "config.json" if path.is_dir() else None)
    if file is None:  # a single file (ComfyUI's t5xxl_fp16 / clip_l): FLUX.1's own encoder, T5-XXL or CLIP-L
        return cls.xxl() if hasattr(cls, "xxl") else cls.vit_l14()
    d = read_json(file, f"{what} config")  # a missing, irregular, huge or invalid file: a named error
    try:
        return cls.from_hf(d)
    except ValueError as e:
        raise CheckpointError(f"{what}: {file}: {e}") from None


def _check_dtype(dtype: torch.dtype | None, what: str) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"{what}: dtype must be a floating dtype, got {dtype}")


def _in_root(path: str | Path, folder: str) -> Path:
    """A FLUX repository root -> its `folder` (text_encoder/, text_encoder_2/); anything else as given."""
    path = Path(path)
    return path / folder if path.is_dir() and (path / folder).is_dir() else path


def load_t5(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            config: T5Config | dict | str | Path | None = None) -> T5Encoder:
    """T5 encoder from a `text_encoder_2/` folder (config.json + safetensors, sharded through
    model.safetensors.index.json or not), a FLUX repository root holding one, or a single .safetensors file
    with `config` (default T5-v1.1-XXL). Defaults: CUDA if available, bf16 there, fp32 on the CPU (minidit.loading.default_device_dtype).
    float16 is refused (T5 v1.1 overflows it); bfloat16 and float32 are fine."""
    path, what = _in_root(path, "text_encoder_2"), "T5 checkpoint"
    device, dtype = default_device_dtype(device, dtype)
    if dtype == torch.float16:
        raise ValueError("load_t5: float16 is not supported (T5 v1.1 activations overflow it); "
                         "use torch.bfloat16 or torch.float32")
    _check_dtype(dtype, "load_t5")
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    cfg = _read_config(path, config, T5Config, what)
    sd = open_checkpoint(path)
    check_config(cfg, f"{what} {path}", sd, {"num_layers": "encoder.block."})  # bounds before building
    keys = {k: k for k in sd}
    tied = "encoder.embed_tokens.weight"
    if tied in keys:
        del keys[tied]
        if "shared.weight" not in keys:
            keys["shared.weight"] = tied
        elif sd.shape(tied) != sd.shape("shared.weight") or not torch.equal(sd[tied], sd["shared.weight"]):
            raise CheckpointError(f"{what} {path}: {tied} differs from shared.weight (T5's encoder embedding is "
                                  "tied to shared.weight; this checkpoint is inconsistent)")
    with torch.device("meta"):
        model = T5Encoder(cfg)
    load_streaming(model, _KeyView(sd, keys), device, dtype, what=f"{what} {path}")
    return model.eval().requires_grad_(False)


def load_clip(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              config: CLIPTextConfig | dict | str | Path | None = None) -> CLIPTextEncoder:
    """CLIP text encoder from a `text_encoder/` folder (config.json + model.safetensors), a FLUX repository root
    holding one, or a single .safetensors file (config: `config`, default CLIP-L). Defaults as load_t5."""
    path, what = _in_root(path, "text_encoder"), "CLIP checkpoint"
    device, dtype = default_device_dtype(device, dtype)
    _check_dtype(dtype, "load_clip")
    if not path.exists():
        raise CheckpointError(f"{what} not found: {path}")
    cfg = _read_config(path, config, CLIPTextConfig, what)
    sd = open_checkpoint(path)
    check_config(cfg, f"{what} {path}", sd, {"num_layers": "encoder.layers."})  # bounds before building
    prefixed = any(k.startswith("text_model.") for k in sd)
    keys = {}
    for k in sd:
        if k.removeprefix("text_model.") == "embeddings.position_ids":
            continue  # an arange buffer, recomputed
        keys[k if prefixed else "text_model." + k] = k
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    load_streaming(model, _KeyView(sd, keys), device, dtype, what=f"{what} {path}")
    return model.eval().requires_grad_(False)


def tokenizer_max_length(folder: Path) -> int | None:
    """`model_max_length` of a tokenizer folder's tokenizer_config.json (None when there is none; one that cannot
    be read is an error). FLUX's own T5 tokenizers say 512; minidit's built-in tiny model says 48, the length it
    was trained with."""
    file = Path(folder) / "tokenizer_config.json"
    if not Path(folder).is_dir() or not os.path.lexists(file):
        return None
    n = read_json(file, "tokenizer config").get("model_max_length")
    return n if isinstance(n, int) and 0 < n else None


def _default_max_length(root: Path) -> int:
    """512, or 256 for FLUX.1-schnell (recognised by its transformer config: no guidance embedding)."""
    cfg = root / "transformer" / "config.json"
    if os.path.lexists(cfg) and read_json(cfg, "transformer config").get("guidance_embeds", True) is False:
        return 256
    return 512


class TextEncoder:
    """The T5 and CLIP encoders with their tokenizers: `encode(prompts) -> (txt, vec)`."""

    def __init__(self, t5: T5Encoder, t5_tokenizer: T5Tokenizer, clip: CLIPTextEncoder,
                 clip_tokenizer: CLIPTokenizer, max_length: int = 512):
        self.t5, self.t5_tokenizer, self.clip, self.clip_tokenizer = t5, t5_tokenizer, clip, clip_tokenizer
        self.max_length = max_length
        self.t5_tokenizer.max_length = max_length

    @classmethod
    def load(cls, root: str | Path | None, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
             max_length: int | None = None, *, clip: str | Path | None = None, t5: str | Path | None = None,
             clip_tokenizer: str | Path | None = None, t5_tokenizer: str | Path | None = None) -> TextEncoder:
        """From a FLUX repository root with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/; any of
        them can be given explicitly instead (clip=, t5=, clip_tokenizer=, t5_tokenizer=; root may then be None).
        max_length: T5 tokens (None: 512, or 256 when the root's transformer/config.json is schnell's).
        device/dtype: as load_t5 (CUDA if available; bf16 there, fp32 on the CPU)."""
        device, dtype = default_device_dtype(device, dtype)
        if root is not None:
            root = Path(root)
            if not root.is_dir():
                raise FileNotFoundError(f"FLUX folder not found: {root}")
        given = {"text_encoder": clip, "text_encoder_2": t5, "tokenizer": clip_tokenizer, "tokenizer_2": t5_tokenizer}
        paths = {k: Path(v) if v is not None else (root / k if root is not None else None) for k, v in given.items()}
        missing = [f"{k}/ ({p})" if p is not None else f"{k}/ (no root folder and no explicit path)"
                   for k, p in paths.items() if p is None or not p.exists()]
        if missing:
            raise FileNotFoundError(f"text encoder files missing: {', '.join(missing)} (a FLUX.1 repository has "
                                    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")
        max_length = max_length or (_default_max_length(root) if root is not None else 512)
        return cls(load_t5(paths["text_encoder_2"], device, dtype),
                   T5Tokenizer(paths["tokenizer_2"], max_length),
                   load_clip(paths["text_encoder"], device, dtype),
                   CLIPTokenizer(paths["tokenizer"]), max_length)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move (and optionally cast) both encoders; returns self."""
        if dtype == torch.float16:
            raise ValueError("TextEncoder.to: float16 is not supported by T5 v1.1; use bfloat16 or float32")
        self.t5.to(device=device, dtype=dtype)
        self.clip.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.t5.shared.weight.device

    @torch.no_grad()
    def encode(self, prompts: str | list[str], prompts_2: str | list[str] | None = None,
               device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """txt (B, max_length, 4096) from T5, vec (B, 768) pooled from CLIP. `prompts_2` (optional) goes to
        T5 instead of `prompts`, as diffusers' `prompt_2`. `device`: where to put the results (default:
        where each encoder is), e.g. the transformer's device when the encoders live elsewhere."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        prompts_2 = prompts if prompts_2 is None else ([prompts_2] if isinstance(prompts_2, str) else prompts_2)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"encode: {len(prompts)} prompts for CLIP but {len(prompts_2)} for T5")
        clip_dev = self.clip.text_model.embeddings.token_embedding.weight.device
        _, vec = self.clip(self.clip_tokenizer(prompts).to(clip_dev))
        txt = self.t5(self.t5_tokenizer(prompts_2).to(self.device))  # no attention mask, as FLUX
        if device is not None:
            txt, vec = txt.to(device), vec.to(device)
        return txt, vec
