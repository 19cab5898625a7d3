"""Reading a FLUX.1 transformer checkpoint: find it in a repository, open it (BFL file, diffusers folder or
ComfyUI file; the config inferred from the tensor shapes, the family member from the input width), and load it
streamed into the model, with LoRAs merged as the tensors arrive (lora.py).

    model = load_transformer("/models/FLUX.1-dev", loras=[("style.safetensors", 0.8)])
    sd, cfg, what = open_transformer("/models/FLUX.1-Fill-dev")     # headers only: cfg.variant == "fill"
    set_loras(model, [])                                            # back to the base weights, no reload
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .loading import (CheckpointError, Converted, LazyStateDict, check_config, default_device_dtype,
                      find_safetensors, load_streaming, read_json)
from .lora import WithLoras, read_loras, touched, widened
from .transformer import VARIANT_WIDTHS, Flux, FluxConfig, diffusers_to_bfl_plan


def find_transformer(root) -> Path | None:
    """The transformer inside a FLUX.1 repository root, in order of preference: `flux1-dev.safetensors` /
    `flux1-schnell.safetensors` (BFL), any other `flux1-*.safetensors` but `*-lora` (an fp8 copy,
    `flux1-fill-dev`, `flux1-depth-dev`, `flux1-canny-dev`, `flux1-kontext-dev`), the diffusers
    `transformer/` folder. None if there is none."""
    root = Path(root)
    for name in ("flux1-dev.safetensors", "flux1-schnell.safetensors"):
        if (root / name).is_file():
            return root / name
    others = sorted(p for p in root.glob("flux1-*.safetensors") if not p.stem.endswith("-lora"))  # not a LoRA
    if others:
        return others[0]
    return root / "transformer" if (root / "transformer").is_dir() else None


def _resolve_transformer(path) -> tuple[list, str]:
    """-> (safetensors files, layout "bfl" | "diffusers" | "auto") for a file, a repo root or a `transformer/` folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"transformer checkpoint not found: {path}")
    if path.is_file():
        return [path], "auto"
    hit = find_transformer(path)
    if hit is None:  # the folder itself holds the weights (a diffusers transformer/ folder)
        return find_safetensors(path), "auto"
    return ([hit], "bfl") if hit.is_file() else (find_safetensors(hit), "diffusers")


def open_transformer(path, cfg: FluxConfig | None = None) -> tuple:
    """A transformer checkpoint (see load_transformer) as a lazy BFL-named state dict, its config (`cfg`, else
    inferred from the shapes; Kontext from a file name holding "kontext" or, for a diffusers repository root, its
    FluxKontextPipeline model_index.json) and its name for messages: nothing is read but headers."""
    files, layout = _resolve_transformer(path)
    repo_root = layout == "diffusers"  # a repository root was given: its model_index.json is inside it
    sd = LazyStateDict(files)
    meta = sd.metadata()
    what = f"transformer checkpoint {files[0].parent if len(files) > 1 else files[0]}"
    prefix = "model.diffusion_model."  # ComfyUI-style single files carry the BFL keys under this prefix
    if len(sd) and all(k.startswith(prefix) for k in sd):
        sd = Converted(sd, {k[len(prefix):]: ("copy", (k,)) for k in sd})
    if layout == "auto":
        layout = "diffusers" if "x_embedder.weight" in sd else "bfl"
    axes_dim = None
    if "axes_dim" in meta:
        axes_dim = tuple(int(a) for a in meta["axes_dim"].split(","))
    kontext = "kontext" in files[0].name.lower()
    if layout == "diffusers":
        config_file = files[0].parent / "config.json"
        if config_file.exists():
            axes_dim = tuple(read_json(config_file, "transformer config").get("axes_dims_rope", axes_dim or ())) or axes_dim
        index = Path(path) / "model_index.json"
        kontext = repo_root and index.exists() and "Kontext" in str(read_json(index, "model index").get("_class_name"))
        blocks = lambda p: len({k.split(".")[1] for k in sd if k.startswith(p)})  # noqa: E731
        sd = Converted(sd, diffusers_to_bfl_plan(blocks("transformer_blocks."), blocks("single_transformer_blocks."),
                                                 "time_text_embed.guidance_embedder.linear_1.weight" in sd))
    if cfg is None:
        cfg = dataclasses.replace(FluxConfig.from_checkpoint({k: sd.shape(k) for k in sd}, axes_dim), kontext=kontext)
    if cfg.in_channels not in VARIANT_WIDTHS.values():
        raise CheckpointError(f"{what}: img_in takes {cfg.in_channels} channels, none of FLUX.1's (64 dev/schnell/"
                              "Kontext, 128 Depth/Canny, 384 Fill)")
    return sd, cfg, what


def load_transformer(path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                     cfg: FluxConfig | None = None, loras=()) -> Flux:
    """Load FLUX.1 (dev, schnell, Fill, Depth/Canny, Kontext) from a BFL file (`flux1-dev.safetensors`), a
    diffusers `transformer/` folder (sharded, keys converted on load), a ComfyUI single file or a FLUX.1 repository
    root holding either. Stored fp32/bf16/fp16/fp8 tensors are cast to `dtype`. Defaults: CUDA if available, bf16
    there, fp32 on the CPU (minidit.loading.default_device_dtype). Built on the meta device and streamed tensor by
    tensor. `loras` [(path, scale), ...]: checked before the model is built, then merged into each tensor as it
    streams in (minidit.lora); a BFL control LoRA widens img_in (dev + depth LoRA is a control model)."""
    sd, cfg, what = open_transformer(path, cfg)
    check_config(cfg, what)  # bounds before any module is built
    loras = read_loras(loras, cfg)
    cfg = widened(cfg, loras)
    device, dtype = default_device_dtype(device, dtype)
    if loras:
        sd = WithLoras(sd, loras, cfg, device)
    with torch.device("meta"):
        model = Flux(cfg)
    model = load_streaming(model, sd, device, dtype, what=what).eval()
    model.source, model.loras = Path(path).absolute(), tuple(loras)  # for minidit.lora.set_loras
    return model


def set_loras(model: Flux, loras) -> Flux:
    """Replace the LoRAs merged into `model` (loaded by load_transformer) by `loras` ([(path, scale), ...], may be
    empty): every tensor the old or new LoRAs touch is re-read from the base checkpoint and merged again, so the
    result is bit-equal to a fresh load with `loras`; nothing is kept for undo."""
    if model.source is None:
        raise ValueError("set_loras needs a model made by load_transformer (it re-reads the base checkpoint)")
    sd, base_cfg, what = open_transformer(model.source)
    new = read_loras(loras, base_cfg)
    cfg = widened(base_cfg, new)
    keys = touched(list(model.loras)) | touched(new)
    params = dict(model.named_parameters())
    ref = next(iter(params.values()))
    device, dtype = ref.device, ref.dtype
    view = WithLoras(sd, new, cfg, device)
    with torch.no_grad():
        for key in sorted(keys):
            t = view.read(key).to(device=device, dtype=dtype)
            if not bool(torch.isfinite(t.float()).all()):
                raise CheckpointError(f"{what}: tensor {key!r} holds NaN or Inf after merging the LoRAs")
            if params[key].shape == t.shape:
                params[key].copy_(t)
            else:  # img_in changes width: a control LoRA on, or off
                model.img_in.weight = torch.nn.Parameter(t, requires_grad=params[key].requires_grad)
    model.cfg, model.loras = cfg, tuple(new)
    return model
