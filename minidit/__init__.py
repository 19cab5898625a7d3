"""minidit: a from-scratch, minimal FLUX.1 in pure PyTorch with training-free subject personalization.

The names below are resolved on first use (PEP 562 `__getattr__`): `from minidit import Pipeline` imports
minidit.pipeline (and torch) then, while `import minidit` alone imports nothing heavy, so that `minidit --help`
answers without waiting for torch (minidit/cli/__init__.py, bench/cli_start.py).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

EXPORTS = {  # public name -> the module that defines it
    "AutoEncoder": "autoencoder", "AutoEncoderConfig": "autoencoder", "load_autoencoder": "autoencoder",
    "load_image": "image", "load_mask": "image", "pil_to_tensor": "image", "tensor_to_pil": "image",
    "CLIPTextConfig": "clip", "CLIPTextEncoder": "clip", "CheckpointError": "loading", "Reference": "masks",
    "Pipeline": "pipeline", "FreeCusSettings": "freecus", "EditSettings": "personalize",
    "PersonalizeSettings": "personalize", "PRESET": "presets", "RefState": "refstate", "T5Config": "t5",
    "T5Encoder": "t5", "TextEncoder": "text_encoder", "load_clip": "text_encoder", "load_t5": "text_encoder",
    "CLIPTokenizer": "tokenizer", "T5Tokenizer": "tokenizer", "load_transformer": "flux_loading",
    "Flux": "transformer", "FluxConfig": "transformer", "ModelDefaults": "defaults",
}
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'minidit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})
