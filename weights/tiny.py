"""A whole tiny FLUX.1 repository in the official layout: the built-in checkpoint and the tests' fixture.

    root/
      flux1-dev.safetensors   (or flux1-schnell.safetensors)   BFL transformer
      ae.safetensors                                            BFL autoencoder
      transformer/  vae/                                        the same weights in the diffusers layout
      text_encoder/  text_encoder_2/                            CLIP-L and T5 (sharded), Hugging Face layout
      tokenizer/  tokenizer_2/                                  real CLIP vocabulary, a tiny SentencePiece model
      scheduler/  model_index.json                              so diffusers' FluxPipeline reads it too

Widths and depths are tiny and the weights random, so its pictures are noise: it exists to run every code
path end to end (and to compare against diffusers), not to make images.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from minidit import files
from minidit.autoencoder import AutoEncoderConfig

from .tiny_ae import write_tiny_ae
from .tiny_flux import TINY, write_tiny_flux
from .tiny_text import TINY_CLIP, TINY_T5, write_clip_tokenizer, write_t5_tokenizer, write_tiny_clip, write_tiny_t5

VERSION = 1  # bump when the tiny repository's contents change, so cached copies are rebuilt

SCHEDULERS = {
    "dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
            "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
            "use_dynamic_shifting": True},
    "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": False},
}
MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_tiny_repo(root: str | Path, variant: str = "dev", seed: int = 0, flux_cfg=None,
                    ae_cfg: AutoEncoderConfig | None = None) -> Path:
    """Write a complete tiny FLUX.1-{variant} repository (both layouts) to `root`. Deterministic from `seed`."""
    if variant not in ("dev", "schnell"):
        raise ValueError(f"variant must be 'dev' or 'schnell', got {variant!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = flux_cfg or replace(TINY, context_in_dim=TINY_T5.d_model, vec_in_dim=TINY_CLIP.hidden_size,
                              guidance_embed=variant == "dev")
    ae_cfg = ae_cfg or AutoEncoderConfig.tiny()
    write_tiny_flux(root / f"flux1-{variant}.safetensors", cfg, seed=seed)
    write_tiny_flux(root / "transformer", cfg, seed=seed, layout="diffusers")
    write_tiny_ae(root / "ae.safetensors", ae_cfg, seed=seed)
    write_tiny_ae(root / "vae", ae_cfg, seed=seed, layout="diffusers")
    write_tiny_clip(root / "text_encoder", seed=seed)
    write_tiny_t5(root / "text_encoder_2", seed=seed)
    write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2", model_max_length=512 if variant == "dev" else 256)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS[variant], indent=2))
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root


def cache_dir() -> Path:
    return Path(os.environ.get("MINIDIT_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minidit"))


MANIFEST = ".complete.json"  # {relative path: size in bytes}, written last: a cache without it is incomplete
STALE_S = 600  # a temporary folder older than this is from a killed first run


def _intact(root: Path) -> bool:
    """Every file the manifest lists is there with its size (a cheap stat each, no hashing)."""
    try:  # the guarded reader: a FIFO or a huge file in the cache is refused from its stat, never opened
        listed = files.read_json(root / MANIFEST, "tiny checkpoint manifest")
        return all(isinstance(size, int) and files.regular(root / plain_path(rel), rel) == size
                   for rel, size in listed.items())
    except ValueError:  # missing, damaged, or a listed path that is not a plain one inside the folder
        return False


def plain_path(rel: str) -> str:
    """A relative path inside the cache folder (no absolute path, no '..'), as the manifest must list them."""
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts or "\0" in rel:
        raise ValueError(f"{rel!r} is not a path inside the cache folder")
    return rel


def _clean_stale(root: Path) -> None:
    for tmp in root.parent.glob(f".{root.name}-*"):
        try:
            if tmp.is_dir() and not tmp.is_symlink() and time.time() - tmp.lstat().st_mtime > STALE_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def tiny_repo(variant: str = "dev") -> Path:
    """The built-in tiny checkpoint: written once into the cache (MINIDIT_CACHE, default ~/.cache/minidit),
    atomically, then reused. A stale temporary folder from a killed first run is removed; an incomplete or
    damaged cache (a file missing or of the wrong size) is rebuilt once and swapped in."""
    root = cache_dir() / f"tiny-flux-{variant}-v{VERSION}"
    if _intact(root):
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(root)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
        try:
            write_tiny_repo(tmp, variant)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps(files, indent=0))
            if os.path.lexists(root) and not _intact(root):  # damaged: move it aside, then swap the new one in
                old = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-old-"))
                os.rename(root, old / "repo")
                shutil.rmtree(old, ignore_errors=True)
            try:
                tmp.rename(root)
            except OSError:  # another process won the race
                if not _intact(root):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise OSError(f"cannot write the built-in tiny checkpoint into {root.parent} ({e.strerror or e}); "
                      "set MINIDIT_CACHE to a writable folder") from None
    return root


