"""Tiny random FLUX transformers written in the official layouts, for tests and the built-in demo.

    write_tiny_flux("flux1-dev.safetensors", TINY)                      # BFL single file
    write_tiny_flux("repo/transformer", TINY, layout="diffusers")        # diffusers folder, sharded
    write_tiny_variant("FLUX.1-Fill-dev", "fill")                         # flux1-fill-dev.safetensors (img_in 384)
    write_tiny_variant("FLUX.1-Kontext-dev", "kontext", layout="diffusers")  # transformer/ + model_index.json

Same key names as the real checkpoints, small widths/depths; deterministic from the seed (each tensor is drawn
from its own generator seeded by (seed, key), so adding a key never changes the others).
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.transformer import Flux, FluxConfig

# width 64, 4 heads of 16 (RoPE split 4+6+6), 2 double + 2 single blocks, tiny text widths
TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=32, hidden_size=64, mlp_ratio=4.0,
                  num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), qkv_bias=True, guidance_embed=True)


def random_state_dict(cfg: FluxConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """BFL-named random tensors with sensible scales: weights ~ N(0, 1/fan_in), biases and norm scales near 0 / 1."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(cfg).state_dict().items()}
    out = {}
    for k, shape in shapes.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))
        x = torch.randn(shape, generator=g)
        if k.endswith(".scale"):                      # QK RMSNorm scales
            x = 1.0 + 0.1 * x
        elif k.endswith(".bias"):
            x = 0.05 * x
        else:
            x = x / shape[-1] ** 0.5
        out[k] = x.contiguous()
    return out


def bfl_to_diffusers(sd: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """Inverse of minidit.transformer.diffusers_to_bfl_plan: split fused qkv/linear1, swap the final scale/shift."""
    from minidit.transformer import diffusers_to_bfl_plan
    h, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    out = {}
    for bfl, (op, srcs) in diffusers_to_bfl_plan(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed).items():
        t = sd[bfl]
        if op == "copy":
            out[srcs[0]] = t
        elif op == "swap":
            a, b = t.chunk(2, dim=0)
            out[srcs[0]] = torch.cat([b, a], dim=0)
        elif op == "cat":
            sizes = [h, h, h] + ([mlp] if len(srcs) == 4 else [])
            for name, part in zip(srcs, t.split(sizes, dim=0)):
                out[name] = part.contiguous()
    return out


def diffusers_config(cfg: FluxConfig) -> dict:
    return {
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1",
        "patch_size": 1, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "num_layers": cfg.depth, "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim, "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed, "axes_dims_rope": list(cfg.axes_dim),
    }


def save_bfl(sd: dict[str, torch.Tensor], cfg: FluxConfig, path) -> Path:
    """A BFL single file; RoPE's axes_dim (not visible in shapes) goes into the safetensors metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"axes_dim": ",".join(map(str, cfg.axes_dim)), "format": "pt"})
    return path


def save_diffusers(sd: dict[str, torch.Tensor], cfg: FluxConfig, folder, shards: int = 2) -> Path:
    """A diffusers `transformer/` folder from BFL-named tensors: config.json, shards and the index json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dsd = bfl_to_diffusers(sd, cfg)
    keys = sorted(dsd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: dsd[k] for k in keys[i::shards]}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[i::shards]})
    total = sum(t.numel() * t.element_size() for t in dsd.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
    return folder


def write_tiny_flux(path, cfg: FluxConfig = TINY, seed: int = 0, layout: str = "bfl", dtype=torch.float32,
                    shards: int = 2, in_channels: int | None = None) -> Path:
    """Write a tiny FLUX transformer. layout "bfl": one safetensors file at `path`; "diffusers": a folder
    `path` with config.json, `diffusion_pytorch_model-0000N-of-0000M.safetensors` shards and the index json.
    `in_channels` (img_in width) overrides cfg's: 64 dev/schnell/Kontext, 128 Depth/Canny, 384 Fill."""
    if in_channels is not None:
        cfg = dataclasses.replace(cfg, in_channels=in_channels)
    sd = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed).items()}
    if layout == "bfl":
        return save_bfl(sd, cfg, path)
    if layout != "diffusers":
        raise ValueError(f"layout must be 'bfl' or 'diffusers', got {layout!r}")
    return save_diffusers(sd, cfg, path, shards)


# the official FLUX.1 family: BFL file stem, img_in width, guidance embedding, diffusers pipeline class
VARIANTS = {
    "dev": ("flux1-dev", 64, True, "FluxPipeline"),
    "schnell": ("flux1-schnell", 64, False, "FluxPipeline"),
    "fill": ("flux1-fill-dev", 384, True, "FluxFillPipeline"),
    "depth": ("flux1-depth-dev", 128, True, "FluxControlPipeline"),
    "canny": ("flux1-canny-dev", 128, True, "FluxControlPipeline"),
    "kontext": ("flux1-kontext-dev", 64, True, "FluxKontextPipeline"),
}


def write_tiny_variant(root, variant: str, cfg: FluxConfig = TINY, seed: int = 0, layout: str = "bfl",
                       dtype=torch.float32) -> Path:
    """A tiny transformer of one FLUX.1 family member under its official name in `root`: layout "bfl" writes
    `root/flux1-<variant>.safetensors`, "comfyui" the same keys under `model.diffusion_model.`, "diffusers"
    `root/transformer/` plus a model_index.json naming the pipeline class (how a Kontext folder is told apart).
    Returns the file or the transformer folder."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    stem, width, guidance, pipeline = VARIANTS[variant]
    cfg = dataclasses.replace(cfg, in_channels=width, guidance_embed=guidance)
    root = Path(root)
    if layout == "diffusers":
        root.mkdir(parents=True, exist_ok=True)
        (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}))
        return write_tiny_flux(root / "transformer", cfg, seed, "diffusers", dtype)
    if layout == "comfyui":
        sd = {f"model.diffusion_model.{k}": v.to(dtype) for k, v in random_state_dict(cfg, seed).items()}
        return save_bfl(sd, cfg, root / f"{stem}.safetensors")
    return write_tiny_flux(root / f"{stem}.safetensors", cfg, seed, layout, dtype)
