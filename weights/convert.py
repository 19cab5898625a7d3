"""Checkpoint conversions between the BFL and diffusers layouts (safetensors in, safetensors out; nothing is
ever unpickled). Loading goes through minidit's own loaders, so a conversion also validates every key and shape.

    python -m minidit.weights.convert transformer SRC DST.safetensors        # diffusers transformer/ -> BFL file
    python -m minidit.weights.convert transformer SRC DST_FOLDER --to diffusers   # BFL file -> transformer/ folder
    python -m minidit.weights.convert ae SRC DST.safetensors                 # diffusers vae/ -> ae.safetensors

The stored dtype is kept unless --dtype is given (fp8 sources are written as bf16: fp8 is a storage format here). Memory: one copy of the component in host RAM (the output is
written with safetensors' save_file, which needs every tensor at once): 23.8 GB for a bf16 FLUX.1 transformer.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.autoencoder import load_autoencoder
from minidit.loading import open_checkpoint
from minidit.flux_loading import load_transformer

from .tiny_flux import save_bfl, save_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a checkpoint (file, folder or repo root's transformer/vae)."""
    for p in (path, path / "transformer", path / "vae"):
        try:
            sd = open_checkpoint(p)
        except ValueError:
            continue
        for k in sd:
            if sd.dtype(k).is_floating_point:
                return torch.bfloat16 if sd.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2) else sd.dtype(k)
    return torch.float32


def convert(component: str, src, dst, to: str = "bfl", dtype: torch.dtype | None = None) -> Path:
    src, dst = Path(src), Path(dst)
    dtype = dtype or stored_dtype(src)
    if component == "transformer":
        model = load_transformer(src, "cpu", dtype)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        return save_bfl(sd, model.cfg, dst) if to == "bfl" else save_diffusers(sd, model.cfg, dst)
    if component == "ae":
        if to != "bfl":
            raise ValueError("the autoencoder converts to the BFL layout (ae.safetensors) only")
        ae = load_autoencoder(src, "cpu", dtype)
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(dst), metadata={"format": "pt"})
        return dst
    raise ValueError(f"component must be 'transformer' or 'ae', got {component!r}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minidit.weights.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("component", choices=["transformer", "ae"])
    ap.add_argument("src", help="file, diffusers folder or FLUX.1 repository root")
    ap.add_argument("dst", help="output .safetensors file (BFL) or folder (--to diffusers)")
    ap.add_argument("--to", choices=["bfl", "diffusers"], default="bfl")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the stored dtype")
    a = ap.parse_args(argv)
    try:
        out = convert(a.component, a.src, a.dst, a.to, DTYPES[a.dtype] if a.dtype else None)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
