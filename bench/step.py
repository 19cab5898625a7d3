"""One full-size FLUX.1-dev transformer step: minidit vs diffusers' FluxTransformer2DModel, same random weights.

    python bench/step.py [--size 1024] [--backend auto|sdpa|triton] [--compile] [--record]   # needs a GPU
    python bench/step.py --smoke                                                               # tiny, CPU

Random bf16 weights are made on the GPU (no checkpoint needed), copied into diffusers' model through diffusers'
own BFL->diffusers converter, and both models run the same inputs: 1024² -> 4096 image + 512 text tokens.
Prints the device, both times and the ratio (target: minidit <= 0.9x diffusers), and the max abs difference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def timeit(fn, iters: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters / 1000
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def random_models(cfg, device, dtype, tiny: bool = False):
    """minidit's Flux with random weights (N(0, 0.02), norm scales 1) and diffusers' FluxTransformer2DModel holding
    the same weights (through diffusers' own BFL->diffusers converter; at tiny widths, which that converter does
    not handle, through minidit's inverse map). -> (ours, theirs), eval mode."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from minidit.transformer import Flux
    with torch.device("meta"):
        ours = Flux(cfg)
    ours = ours.to_empty(device=device).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02 if p.ndim > 1 else 0.01, generator=g)
    sd = dict(ours.state_dict())
    if tiny:
        from minidit.weights.tiny_flux import bfl_to_diffusers
        dsd = bfl_to_diffusers(sd, cfg)
    else:
        dsd = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=cfg.depth,
                                        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
                                        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
                                        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=True,
                                        axes_dims_rope=cfg.axes_dim)
    theirs.load_state_dict(dsd, assign=True, strict=True)
    return ours, theirs.to(device, dtype).eval()


def model_calls(ours, theirs, cfg, size: int, n_txt: int, device, dtype, g):
    """Random inputs for a size x size image and n_txt text tokens -> (call ours, call theirs, image tokens N).
    Either model may be None (its call is then None)."""
    from minidit import sampling
    B = 1
    h, w = sampling.latent_size(size, size)
    N = (h // 2) * (w // 2)
    img = torch.randn(B, N, 64, device=device, dtype=dtype, generator=g)
    txt = torch.randn(B, n_txt, cfg.context_in_dim, device=device, dtype=dtype, generator=g)
    y = torch.randn(B, cfg.vec_in_dim, device=device, dtype=dtype, generator=g)
    t = torch.full((B,), 0.7, device=device, dtype=dtype)
    gd = torch.full((B,), 3.5, device=device, dtype=dtype)
    img_ids = sampling.image_ids(B, size, size, device)
    txt_ids = sampling.text_ids(B, n_txt, device)
    run_ours = None if ours is None else lambda: ours(img, img_ids, txt, txt_ids, t, y, gd)  # noqa: E731
    run_theirs = None if theirs is None else lambda: theirs(  # noqa: E731
        hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids[0],
        txt_ids=txt_ids[0], guidance=gd, return_dict=False)[0]
    return run_ours, run_theirs, N


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--backend", default=None, choices=["sdpa", "triton", "reference"])
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU: shows the script runs end to end")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()

    from minidit import attention as attn
    from minidit.transformer import FluxConfig

    if a.backend:
        attn.set_backend(a.backend)
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        raise SystemExit("bench/step.py needs a CUDA GPU (use --smoke for a CPU run of the code path)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = FluxConfig.preset("flux-dev")
    if a.smoke:
        a.size, a.txt, a.iters = 128, 16, 2
        cfg = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(16, 56, 56),
                         context_in_dim=64, vec_in_dim=32)

    ours, theirs = random_models(cfg, device, dtype, tiny=a.smoke)
    g = torch.Generator(device).manual_seed(1)
    run_ours, run_theirs, N = model_calls(ours, theirs, cfg, a.size, a.txt, device, dtype, g)
    if a.compile:
        run_ours, run_theirs = torch.compile(run_ours), torch.compile(run_theirs)
    with torch.no_grad():
        diff = (run_ours().float() - run_theirs().float()).abs().max().item()
        t_ours = timeit(run_ours, a.iters, 3 if cuda else 1, cuda)
        t_theirs = timeit(run_theirs, a.iters, 3 if cuda else 1, cuda)

    dev_name = torch.cuda.get_device_name() if cuda else "CPU (smoke run, tiny config, not a measurement)"
    backend = a.backend or ("auto: " + attn.auto_backend(torch.empty(1, 1, 1, cfg.head_dim, device=device, dtype=dtype), reference=False))
    print(f"device: {dev_name}   torch {torch.__version__}   dtype {dtype}   attention backend {backend}"
          f"{'   compiled' if a.compile else ''}")
    print(f"shape: {a.size}x{a.size} -> {N} image + {a.txt} text tokens, {cfg.depth}+{cfg.depth_single_blocks} blocks, "
          f"hidden {cfg.hidden_size}")
    print(f"{'model':<12} {'time/step':>12}")
    print(f"{'diffusers':<12} {t_theirs * 1000:10.2f} ms   (baseline)")
    print(f"{'minidit':<12} {t_ours * 1000:10.2f} ms   ratio {t_ours / t_theirs:.3f}x (target <= 0.9x)")
    print(f"max abs diff of outputs: {diff:.3e}")
    if a.record and cuda:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import record
        record("Transformer step (bench/step.py)",
               f"### {dev_name}, {a.size}², bf16, backend {backend}{', compiled' if a.compile else ''}, "
               f"torch {torch.__version__}\n\n| model | ms/step | ratio |\n|---|---|---|\n"
               f"| diffusers 0.42.1 | {t_theirs * 1000:.2f} | 1.00 |\n| minidit | {t_ours * 1000:.2f} | "
               f"{t_ours / t_theirs:.3f} |")


if __name__ == "__main__":
    main()
