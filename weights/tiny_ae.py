"""Tiny random autoencoder checkpoints in the official layouts, for tests and offline pipeline runs.

    write_tiny_ae(tmp / "ae.safetensors")                      # BFL single file, like FLUX.1's ae.safetensors
    write_tiny_ae(tmp / "vae", layout="diffusers")             # diffusers vae/ folder: config.json + weights

Both layouts hold the same tensors for the same (cfg, seed). The default config is `AutoEncoderConfig.tiny()`:
4 levels (8x downsampling, as FLUX's pipeline assumes), 16 latent channels, widths 32/32/64/64 so GroupNorm(32)
stays valid. The BFL -> diffusers key mapping below is written independently of the loader's inverse.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.autoencoder import AutoEncoder, AutoEncoderConfig


def tiny_ae_state_dict(cfg: AutoEncoderConfig | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights in ae.safetensors names, deterministic from `seed`. Conv weights ~ N(0, 1/fan_in),
    biases ~ N(0, 0.1^2), GroupNorm scales ~ 1 + N(0, 0.1^2), so activations stay O(1) through the network."""
    cfg = cfg or AutoEncoderConfig.tiny()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoEncoder(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) == 4:
            t = t / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif k.endswith(".weight"):  # GroupNorm scale
            t = 1 + 0.1 * t
        else:
            t = 0.1 * t
        sd[k] = t.contiguous()
    return sd


def to_diffusers_name(key: str, levels: int) -> str:
    """An ae.safetensors key -> diffusers AutoencoderKL key (`levels` = len(ch_mult))."""
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    # BFL's decoder.up.{i} is the level at resolution 2^-i; diffusers' up_blocks are in execution order
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", k)
    k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", k)
    names = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    k = re.sub(r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f".mid_block.attentions.0.{names[m[1]]}.", k)
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def to_diffusers(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A BFL autoencoder state dict in diffusers names; the attention 1x1 convs become Linear weights."""
    out = {}
    for k, t in sd.items():
        new = to_diffusers_name(k, levels)
        if re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", new):
            t = t[:, :, 0, 0]
        out[new] = t.contiguous()
    return out


def diffusers_config(cfg: AutoEncoderConfig) -> dict:
    """The AutoencoderKL config.json of FLUX.1's vae/ folder, with `cfg`'s sizes."""
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0.dev0",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.z_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": cfg.out_ch,
        "sample_size": 1024,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    }


def write_tiny_ae(path: str | Path, cfg: AutoEncoderConfig | None = None, seed: int = 0,
                  layout: str = "bfl", sd: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a random AE (or the given BFL-named `sd`, e.g. trained). layout "bfl": `path` is the .safetensors
    file (or a folder, which gets ae.safetensors); layout "diffusers": `path` is the vae/ folder (config.json +
    diffusion_pytorch_model.safetensors). Scale/shift factors other than FLUX's go into the BFL file's metadata
    (diffusers keeps them in config.json). Returns the file (bfl) or folder (diffusers) written."""
    cfg = cfg or AutoEncoderConfig.tiny()
    sd = tiny_ae_state_dict(cfg, seed) if sd is None else sd
    path = Path(path)
    if layout == "bfl":
        if path.suffix != ".safetensors":
            path = path / "ae.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt"}
        flux = AutoEncoderConfig.flux()
        if (cfg.scale_factor, cfg.shift_factor) != (flux.scale_factor, flux.shift_factor):
            meta.update(scale_factor=repr(cfg.scale_factor), shift_factor=repr(cfg.shift_factor))
        save_file(sd, str(path), metadata=meta)
        return path
    if layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        save_file(to_diffusers(sd, len(cfg.ch_mult)), str(path / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2) + "\n")
        return path
    raise ValueError(f"layout must be 'bfl' or 'diffusers', got {layout!r}")
