"""Tiny random FLUX.1 LoRAs in the layouts found in the wild, for tests:

    write_tiny_lora("style.safetensors", TINY, "kohya", rank=4)     # lora_unet_*.lora_down/up + .alpha
    write_tiny_lora("depth.safetensors", TINY, "bfl-control")         # BFL's control LoRA: img_in 64 -> 128

Layouts: "kohya" (sd-scripts), "diffusers" (PEFT / ai-toolkit, `transformer.` prefix), "bfl" (BFL names,
lora_A/lora_B), "bfl-control" (every Linear with a biased lora_B, img_in's lora_A 128 wide, QK-norm scales, as
FLUX.1-Depth-dev-lora), "xlabs" (attention only, `processor.qkv_lora1` ...). Deterministic from the seed.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.transformer import Flux, FluxConfig

from .tiny_flux import bfl_to_diffusers

LAYOUTS = ("kohya", "diffusers", "bfl", "bfl-control", "xlabs")


def lora_shapes(cfg: FluxConfig, layout: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear a LoRA of `layout` may target, under that layout's module names."""
    with torch.device("meta"):
        sd = Flux(cfg).state_dict()
    bfl = {k[:-len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2}
    if layout == "kohya":
        return {"lora_unet_" + m.replace(".", "_"): s for m, s in bfl.items()}
    if layout == "diffusers":
        d = bfl_to_diffusers(sd, cfg)
        return {"transformer." + k[:-len(".weight")]: tuple(v.shape) for k, v in d.items()
                if k.endswith(".weight") and v.ndim == 2}
    if layout == "xlabs":
        h = cfg.hidden_size
        out = {}
        for i in range(cfg.depth):
            out |= {f"double_blocks.{i}.processor.qkv_lora{j}": (3 * h, h) for j in (1, 2)}
            out |= {f"double_blocks.{i}.processor.proj_lora{j}": (h, h) for j in (1, 2)}
        for i in range(cfg.depth_single_blocks):
            out[f"single_blocks.{i}.processor.qkv_lora"] = (3 * h, h)
            out[f"single_blocks.{i}.processor.proj_lora"] = (h, bfl[f"single_blocks.{i}.linear2"][1])
        return out
    return bfl


def randn(key: str, shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode())))


def tiny_lora(cfg: FluxConfig, layout: str, rank: int = 4, seed: int = 0, only: tuple[str, ...] = (),
              skip: tuple[str, ...] = (), alpha: float | None = None, control_width: int = 128) -> dict:
    """{key: tensor} of a random LoRA on every Linear of `layout` whose name holds one of `only` (all if empty)
    and none of `skip`. Delta entries are about the size of the weights' (B·A ~ N(0, 1/in)). `alpha`: kohya's
    `.alpha` (and diffusers' `.alpha` keys) if given."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names = ("lora_down.weight", "lora_up.weight") if layout == "kohya" else \
        ("down.weight", "up.weight") if layout == "xlabs" else ("lora_A.weight", "lora_B.weight")
    out = {}
    for m, (o, i) in lora_shapes(cfg, "bfl" if layout == "bfl-control" else layout).items():
        if only and not any(s in m for s in only) or any(s in m for s in skip):
            continue
        if layout == "bfl-control" and m == "img_in":
            i = control_width
        r = min(rank, o, i)
        out[f"{m}.{names[0]}"] = (randn(f"{m}.A", (r, i), seed) / i ** 0.5).contiguous()
        out[f"{m}.{names[1]}"] = (randn(f"{m}.B", (o, r), seed) / r ** 0.5).contiguous()
        if layout == "bfl-control":
            out[f"{m}.lora_B.bias"] = 0.05 * randn(f"{m}.b", (o,), seed)
        if alpha is not None and layout in ("kohya", "diffusers"):
            out[f"{m}.alpha"] = torch.tensor(float(alpha))
    if layout == "bfl-control":
        with torch.device("meta"):
            sd = Flux(cfg).state_dict()
        for k, v in sd.items():
            if k.endswith("norm.scale"):
                out[k] = 1.0 + 0.1 * randn(k, v.shape, seed)
    return out


def write_tiny_lora(path, cfg: FluxConfig, layout: str, dtype=torch.float32, metadata: dict | None = None,
                    **kw) -> Path:
    """tiny_lora(cfg, layout, **kw) saved as a safetensors file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in tiny_lora(cfg, layout, **kw).items()}
    save_file(sd, str(path), metadata=metadata or {"format": "pt"})
    return path
