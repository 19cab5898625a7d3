"""Random full-size (or, with --smoke, tiny) models for bench/gpu.py, made on the device they run on, and the
run's shared context `Ctx`. Weights are random: every item measures time and memory, not images.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

import attention as attn_bench  # bench/attention.py: the kernel benchmark's shapes
from minidit.autoencoder import AutoEncoder, AutoEncoderConfig
from minidit.clip import CLIPTextConfig, CLIPTextEncoder
from minidit.loading import Converted
from minidit.pipeline import Pipeline
from minidit.t5 import T5Config, T5Encoder
from minidit.text_encoder import TextEncoder
from minidit.transformer import Flux, FluxConfig, diffusers_to_bfl_plan

GiB = 2 ** 30
PROMPT = "a photo of a red toy car on a wooden table"


@dataclass
class Table:
    """One item's result: a markdown table, notes under it, README sentences and a status."""
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    readme: list[str] = field(default_factory=list)   # measured figures for README.md (--record)
    status: str = "ok"

    def markdown(self) -> str:
        lines = [f"**{self.title}** ({self.status})", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines + ([""] + [f"- {n}" for n in self.notes] if self.notes else []))


def fmt(x, spec=".3g", none="n/a") -> str:
    return none if x is None else format(x, spec)


def flux_flops(cfg, n_img: int, n_txt: int) -> float:
    """Matmul FLOPs of one FLUX forward, batch 1: every one of the depth + single blocks does
    2·L·(4h² + 2h·m) (qkv, out projection, MLP) + 4·L²·h (QKᵀ and PV), L = n_img + n_txt, h = hidden, m = MLP
    width; plus img_in, txt_in and the final projection. Modulation and embedder MLPs (one vector per item,
    < 0.01 %) are left out. FLUX.1-dev at 1024² (4096 + 512 tokens): 74.4 TFLOP."""
    h, m, L = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio), n_img + n_txt
    per_block = 2 * L * (4 * h * h + 2 * h * m) + 4 * L * L * h
    io = 2 * n_img * cfg.in_channels * h + 2 * n_txt * cfg.context_in_dim * h + 2 * n_img * h * cfg.out_channels
    return cfg.n_layers * per_block + io


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights in place, on the module's device: norm scales 1, other vectors N(0, 0.01), matrices N(0, 0.02)."""
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and (name.endswith(".scale") or ("norm" in name and name.endswith(".weight"))):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02 if p.ndim > 1 else 0.01, generator=g)
    return module.eval()


def on_device(build, device, dtype, seed: int = 0) -> nn.Module:
    """`build()` on the meta device, then memory on `device` in `dtype` and random weights there (never on the CPU)."""
    with torch.device("meta"):
        module = build()
    return randomize(module.to(dtype).to_empty(device=device), seed)


def diffusers_flux(cfg, device, dtype):
    from diffusers import FluxTransformer2DModel
    return on_device(lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed, axes_dims_rope=cfg.axes_dim),
        device, dtype)


def flux_from_diffusers(theirs, cfg, device, dtype) -> Flux:
    """minidit's Flux holding diffusers' weights, through minidit's own diffusers -> BFL key plan."""
    src = Converted(theirs.state_dict(), diffusers_to_bfl_plan(cfg.depth, cfg.depth_single_blocks, cfg.guidance_embed))
    with torch.device("meta"):
        ours = Flux(cfg)
    ours = ours.to(dtype).to_empty(device=device)
    names = dict(ours.named_parameters())
    if set(names) != set(src) or src.missing:
        raise RuntimeError(f"key plan mismatch: {sorted(set(names) ^ set(src))[:5]} missing {src.missing[:5]}")
    with torch.no_grad():
        for name, p in names.items():
            p.copy_(src[name])
    return ours.eval()


class FixedTokens:
    """Stands in for a tokenizer (no vocabulary files travel to the GPU machine): the same random ids for every
    prompt, `max_length` of them. Text encoding is not what is measured; T5 and CLIP still run at full size."""

    def __init__(self, max_length: int, vocab: int, seed: int):
        self.max_length, self.vocab, self.seed = max_length, vocab, seed

    def __call__(self, prompts) -> torch.Tensor:
        n = 1 if isinstance(prompts, str) else len(prompts)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(1, self.vocab, (n, self.max_length), generator=g)


def text_encoder(ctx) -> TextEncoder:
    t5 = on_device(lambda: T5Encoder(ctx.t5_cfg), ctx.device, ctx.dtype, seed=2)
    clip = on_device(lambda: CLIPTextEncoder(ctx.clip_cfg), ctx.device, ctx.dtype, seed=3)
    return TextEncoder(t5, FixedTokens(ctx.n_txt, ctx.t5_cfg.vocab_size, 4), clip,
                       FixedTokens(ctx.clip_cfg.max_positions, ctx.clip_cfg.vocab_size, 5), ctx.n_txt)


def pipeline(ctx, offload: bool = False) -> Pipeline:
    """A Pipeline of random full-size (or, smoke, tiny) components sharing ctx's transformer."""
    if "text" not in ctx.cache:
        ctx.cache["text"] = text_encoder(ctx)
        ctx.cache["ae"] = on_device(lambda: AutoEncoder(ctx.ae_cfg), ctx.device, ctx.dtype, seed=6)
    return Pipeline(ctx.flux(), ctx.cache["ae"], ctx.cache["text"], ctx.device, ctx.dtype, offload=offload,
                    name="random weights")


class Ctx:
    """What every item reads: device, dtype, shapes and model configs (full size, or tiny with `smoke`), the time
    left of the running item (`left()`, set by the runner) and a cache of the random models the items share."""

    def __init__(self, smoke: bool, peak: float | None):
        self.smoke, self.peak, self.cache = smoke, peak, {}
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.left = lambda: math.inf
        if not smoke:
            self.cfg, self.size, self.n_txt = FluxConfig.preset("flux-dev"), 1024, 512
            self.t5_cfg, self.clip_cfg, self.ae_cfg = T5Config.xxl(), CLIPTextConfig.vit_l14(), AutoEncoderConfig.flux()
            self.heads, self.head_dim, self.check_tokens = 24, 128, attn_bench.SHAPES["1024²"]
            self.attn_shapes, self.check_dtypes = attn_bench.SHAPES, (torch.bfloat16, torch.float16)
            self.step_iters, self.method_steps, self.agree, self.compile_backend = (5, 2), (2, 6), 5e-2, "inductor"
        else:  # tiny, CPU, triton's interpreter: fp32/fp16 (its bf16 tl.dot is wrong), eager torch.compile backend
            self.cfg = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(16, 56, 56),
                                  context_in_dim=64, vec_in_dim=32)
            self.size, self.n_txt = 64, 16
            self.t5_cfg = T5Config(vocab_size=128, d_model=64, d_ff=128, num_heads=2, d_kv=32, num_layers=2)
            self.clip_cfg = CLIPTextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                                           num_heads=2)
            self.ae_cfg = AutoEncoderConfig.tiny()
            self.heads, self.head_dim, self.check_tokens = 2, 64, 64
            self.attn_shapes, self.check_dtypes = {"tiny 8×8": 64}, (torch.float16, torch.float32)
            self.step_iters, self.method_steps, self.agree, self.compile_backend = (1, 0), (1, 2), 1e-5, "eager"

    def flux(self, with_diffusers: bool = False) -> Flux:
        """The random minidit transformer the items share; with `with_diffusers`, built from a random diffusers
        FluxTransformer2DModel (kept in cache["diffusers"]) through minidit's key plan, so both hold the same
        weights."""
        if "flux" in self.cache and (not with_diffusers or "diffusers" in self.cache):
            return self.cache["flux"]
        self.cache.pop("flux", None)
        if with_diffusers:
            try:
                self.cache["diffusers"] = diffusers_flux(self.cfg, self.device, self.dtype)
            except Exception as e:  # no diffusers (or a broken one): minidit is still measured, alone
                self.cache["diffusers_why"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if "diffusers" in self.cache:
            self.cache["flux"] = flux_from_diffusers(self.cache["diffusers"], self.cfg, self.device, self.dtype)
        else:
            self.cache["flux"] = on_device(lambda: Flux(self.cfg), self.device, self.dtype)
        return self.cache["flux"]


@contextmanager
def compiled_blocks(model: nn.Module, lists: tuple[str, ...], backend: str):
    """Regional torch.compile: each block of the named ModuleLists through torch.compile (one compile per block
    class, reused by every block: what diffusers' compile_repeated_blocks does), restored afterwards."""
    kept = {name: getattr(model, name) for name in lists}
    try:
        for name, blocks in kept.items():
            setattr(model, name, nn.ModuleList(torch.compile(b, backend=backend) for b in blocks))
        yield model
    finally:
        for name, blocks in kept.items():
            setattr(model, name, blocks)


def sync(ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def seconds(ctx, fn) -> float:
    sync(ctx)
    t0 = time.perf_counter()
    fn()
    sync(ctx)
    return time.perf_counter() - t0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


