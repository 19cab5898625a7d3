"""The FLUX.1 MMDiT, from scratch. Parameter names equal the official BFL checkpoint keys
(`double_blocks.{i}.img_attn.qkv.weight`, `single_blocks.{i}.linear1.weight`, ...), so a BFL file loads with a
plain strict `load_state_dict`.

    img (B, N, 64)  packed 2x2 latent patches        txt (B, T, 4096)  T5 states
    img_ids (B, N, 3), txt_ids (B, T, 3)             y (B, 768)        CLIP pooled vector
    timesteps (B,) in [0, 1]                          guidance (B,)     (dev only)
        -> velocity (B, N, 64)

19 double-stream blocks (separate img/txt weights, joint attention over [txt; img]) then 38 single-stream
blocks (one fused linear for qkv + MLP) for FLUX.1-dev/schnell. Personalization enters only through an
optional `RefState` (refstate.py), read by a few marked branches in the two block forwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import attention
from .refstate import RefState
from .rope import embed_nd


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64            # img_in width: 64 dev/schnell/Kontext, 128 Depth/Canny (control), 384 Fill
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19                  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True      # dev: guidance-distilled; schnell: no guidance embedding
    kontext: bool = False            # FLUX.1-Kontext-dev: dev's shapes, told apart by its file or pipeline name

    @property
    def variant(self) -> str:
        """The FLUX.1 family member: "fill" (img_in takes noise + masked-image latents + the packed 16x16-pixel
        mask, 64 + 64 + 256), "control" (noise + control-image latents, 64 + 64: Depth/Canny), "kontext", "dev"
        or "schnell" (64)."""
        wide = {VARIANT_WIDTHS["fill"]: "fill", VARIANT_WIDTHS["control"]: "control"}.get(self.in_channels)
        return wide or ("kontext" if self.kontext else "dev" if self.guidance_embed else "schnell")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def n_layers(self) -> int:
        return self.depth + self.depth_single_blocks

    @staticmethod
    def preset(name: str) -> "FluxConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown FLUX preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def from_checkpoint(shapes: dict[str, tuple[int, ...]], axes_dim: tuple[int, ...] | None = None) -> "FluxConfig":
        """Infer the config from a BFL-layout checkpoint's tensor shapes (tiny and full size alike).
        RoPE's axes_dim is not visible in shapes: taken from `axes_dim`, else FLUX's (16, 56, 56) when head_dim=128."""
        def shape(k):
            if k not in shapes:
                raise ValueError(f"cannot infer the FLUX config: key {k!r} is missing from the checkpoint")
            return shapes[k]
        hidden, in_ch = shape("img_in.weight")
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        count = lambda prefix: len({k.split(".")[1] for k in shapes if k.startswith(prefix)})  # noqa: E731
        if axes_dim is None:
            if head_dim != 128:
                raise ValueError(f"head_dim {head_dim} != 128: pass axes_dim (RoPE split) explicitly")
            axes_dim = (16, 56, 56)
        if sum(axes_dim) != head_dim:
            raise ValueError(f"axes_dim {axes_dim} must sum to head_dim {head_dim}")
        return FluxConfig(
            in_channels=in_ch, out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1], context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden, mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
            num_heads=hidden // head_dim, depth=count("double_blocks."), depth_single_blocks=count("single_blocks."),
            axes_dim=tuple(axes_dim), qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
            guidance_embed="guidance_in.in_layer.weight" in shapes)


PRESETS = {"flux-dev": FluxConfig(guidance_embed=True), "flux-schnell": FluxConfig(guidance_embed=False),
           "flux-fill": FluxConfig(in_channels=384), "flux-control": FluxConfig(in_channels=128),
           "flux-kontext": FluxConfig(kontext=True)}
VARIANT_WIDTHS = {"base": 64, "control": 128, "fill": 384}  # img_in input width of each family member


# ---------------------------------------------------------------------------------------------------- layers

def timestep_embedding(t: Tensor, dim: int = 256, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t (B,) in [0, 1] (scaled by time_factor): (B, dim) as [cos, sin]."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the projections of one stream; the attention itself is joint and happens in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, dim) -> q, k, v (B, H, L, D), q and k RMS-normed."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


def fp16_clip(x: Tensor) -> Tensor:
    """FLUX's text stream and single-block outputs exceed fp16's range; clip them there (as diffusers does)."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def joint_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, n_txt: int, ref: RefState | None, layer: int) -> Tensor:
    """Attention over [txt; img] for every batch item; where `ref` shares this layer, the targets also see the
    references' subject keys/values (masked, λ-scaled) while the reference items attend normally."""
    if ref is None or not ref.shares(layer):
        return attention(q, k, v, pe)
    n = ref.n_batch  # reference items at the front of the batch (0: the targets alone, reading RefState.kept)
    ref_k, ref_v, ref_mask = ref.reference_kv(k, v, pe, n_txt, layer)
    if ref.share_refs or n == 0:  # every item sees them (share_refs: Personalize Anything's released code)
        return attention(q, k, v, pe, ref_k=ref_k, ref_v=ref_v, ref_mask=ref_mask, lambda_ref=ref.lambda_ref,
                         lambda_txt=ref.lambda_txt, n_txt=n_txt, mask_mode=ref.mask_mode)
    out_refs = attention(q[:n], k[:n], v[:n], pe[:n])
    if q.shape[0] == n:  # the references alone (their targets run next, reading what they kept)
        return out_refs
    out_targets = attention(q[n:], k[n:], v[n:], pe[n:], ref_k=ref_k, ref_v=ref_v, ref_mask=ref_mask,
                            lambda_ref=ref.lambda_ref, lambda_txt=ref.lambda_txt, n_txt=n_txt,
                            mask_mode=ref.mask_mode)
    return torch.cat([out_refs, out_targets], dim=0)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden, hidden_size))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                ref: RefState | None = None, layer: int = 0) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        attn = self.attention(img, txt, img_mod1, txt_mod1, pe, ref, layer)  # (B, T+N, H*D)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt)))
        return img, fp16_clip(txt)

    def attention(self, img: Tensor, txt: Tensor, img_mod: ModulationOut, txt_mod: ModulationOut, pe: Tensor,
                  ref: RefState | None, layer: int) -> Tensor:
        """Joint attention over [txt; img] -> (B, T+N, H*D); every q/k/v dies when this returns."""
        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod.apply(self.img_norm1(img)))  # (B, H, N, D)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod.apply(self.txt_norm1(txt)))  # (B, H, T, D)

        if ref is not None and ref.replace:  # Personalize Anything, t > τ: targets take the reference's tokens
            img_q, img_k, img_v = ref.replace_tokens((img_q, img_k, img_v), layer)
        if ref is not None:
            ref.record(layer, img_q, img_k, img_v)

        q, k, v = (torch.cat(x, dim=2) for x in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        del img_q, img_k, img_v, txt_q, txt_k, txt_v  # only the joint copies live through the attention
        return joint_attention(q, k, v, pe, txt.shape[1], ref, layer)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv and MLP-in, fused
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)      # attn-out and MLP-out, fused
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, n_txt: int,
                ref: RefState | None = None, layer: int = 0) -> Tensor:
        mod, _ = self.modulation(vec)
        h = mod.apply(self.pre_norm(x))  # (B, L, hidden), x = [txt; img]
        # linear1's rows are [qkv; MLP-in]: the two halves run as separate matmuls (as diffusers' separate Linears
        # do), so the (B, L, 3*hidden + mlp_hidden) output is never held whole, the MLP half only after attention
        w, b, n_qkv = self.linear1.weight, self.linear1.bias, 3 * self.hidden_size
        attn_mlp = torch.cat((self.attention(F.linear(h, w[:n_qkv], b[:n_qkv]), pe, n_txt, ref, layer),
                              self.mlp_act(F.linear(h, w[n_qkv:], b[n_qkv:]))), dim=2)  # (B, L, hidden + mlp_hidden)
        del h
        return fp16_clip(x + mod.gate * self.linear2(attn_mlp))

    def attention(self, qkv: Tensor, pe: Tensor, n_txt: int, ref: RefState | None, layer: int) -> Tensor:
        """qkv (B, L, 3*hidden) -> joint attention output (B, L, hidden); q/k/v die when this returns."""
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)

        if ref is not None and ref.replace:  # Personalize Anything, t > τ (image tokens start after the text)
            q, k, v = ref.replace_tokens((q, k, v), layer, offset=n_txt)
        if ref is not None:
            ref.record(layer, q[:, :, n_txt:], k[:, :, n_txt:], v[:, :, n_txt:])
        return joint_attention(q, k, v, pe, n_txt, ref, layer)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


# ---------------------------------------------------------------------------------------------------- model

class Flux(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if sum(cfg.axes_dim) != cfg.head_dim:
            raise ValueError(f"axes_dim {cfg.axes_dim} must sum to head_dim {cfg.head_dim}")
        self.cfg = cfg
        self.source, self.loras = None, ()  # set by load_transformer: the checkpoint and the LoRAs merged into it
        h = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, h, bias=True)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if cfg.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(cfg.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(h, cfg.out_channels)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, ref: RefState | None = None) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be (B, L, C) sequences, got {tuple(img.shape)} and {tuple(txt.shape)}")
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.cfg.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (dev): pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = embed_nd(torch.cat((txt_ids, img_ids), dim=1), self.cfg.axes_dim, self.cfg.theta)  # (B, 1, T+N, D/2, 2, 2)
        n_txt = txt.shape[1]

        layer = 0
        for block in self.double_blocks:
            if img.shape[0] == 0:  # the references alone, dropped after their last layer: nothing left to run
                break
            img, txt = block(img, txt, vec, pe, ref, layer)
            img, txt, vec, pe, ref = _drop_references(ref, layer, img, txt, vec, pe)
            layer += 1
        x = torch.cat((txt, img), dim=1)
        del txt, img  # not held through the single blocks
        for block in self.single_blocks:
            if x.shape[0] == 0:  # the references alone, dropped after their last layer: nothing left to run
                break
            x = block(x, vec, pe, n_txt, ref, layer)
            x, _, vec, pe, ref = _drop_references(ref, layer, x, None, vec, pe)
            layer += 1
        return self.final_layer(x[:, n_txt:], vec)


def _drop_references(ref, layer, *xs):
    """After `ref.last_layer`, the reference items leave the batch (their output is not needed)."""
    if ref is None or ref.last_layer is None or layer != ref.last_layer:
        return (*xs, ref)
    return (*(None if x is None else x[ref.n_batch:] for x in xs), None)


# ---------------------------------------------------------------------------------------------------- loading

def diffusers_to_bfl_plan(depth: int, depth_single: int, guidance: bool) -> dict:
    """Key plan (minidit.loading.Converted) from the diffusers `transformer/` layout to BFL names."""
    plan = {
        "img_in.weight": ("copy", ("x_embedder.weight",)), "img_in.bias": ("copy", ("x_embedder.bias",)),
        "txt_in.weight": ("copy", ("context_embedder.weight",)), "txt_in.bias": ("copy", ("context_embedder.bias",)),
        "final_layer.linear.weight": ("copy", ("proj_out.weight",)), "final_layer.linear.bias": ("copy", ("proj_out.bias",)),
        # diffusers' AdaLayerNormContinuous stores (scale, shift); BFL's final layer (shift, scale)
        "final_layer.adaLN_modulation.1.weight": ("swap", ("norm_out.linear.weight",)),
        "final_layer.adaLN_modulation.1.bias": ("swap", ("norm_out.linear.bias",)),
    }
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder"} | ({"guidance_in": "guidance_embedder"} if guidance else {})
    for bfl, d in emb.items():
        for p in ("weight", "bias"):
            plan[f"{bfl}.in_layer.{p}"] = ("copy", (f"time_text_embed.{d}.linear_1.{p}",))
            plan[f"{bfl}.out_layer.{p}"] = ("copy", (f"time_text_embed.{d}.linear_2.{p}",))
    for i in range(depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            plan[f"{b}.img_mod.lin.{p}"] = ("copy", (f"{t}.norm1.linear.{p}",))
            plan[f"{b}.txt_mod.lin.{p}"] = ("copy", (f"{t}.norm1_context.linear.{p}",))
            plan[f"{b}.img_attn.qkv.{p}"] = ("cat", tuple(f"{t}.attn.to_{x}.{p}" for x in "qkv"))
            plan[f"{b}.txt_attn.qkv.{p}"] = ("cat", tuple(f"{t}.attn.add_{x}_proj.{p}" for x in "qkv"))
            plan[f"{b}.img_attn.proj.{p}"] = ("copy", (f"{t}.attn.to_out.0.{p}",))
            plan[f"{b}.txt_attn.proj.{p}"] = ("copy", (f"{t}.attn.to_add_out.{p}",))
            plan[f"{b}.img_mlp.0.{p}"] = ("copy", (f"{t}.ff.net.0.proj.{p}",))
            plan[f"{b}.img_mlp.2.{p}"] = ("copy", (f"{t}.ff.net.2.{p}",))
            plan[f"{b}.txt_mlp.0.{p}"] = ("copy", (f"{t}.ff_context.net.0.proj.{p}",))
            plan[f"{b}.txt_mlp.2.{p}"] = ("copy", (f"{t}.ff_context.net.2.{p}",))
        plan[f"{b}.img_attn.norm.query_norm.scale"] = ("copy", (f"{t}.attn.norm_q.weight",))
        plan[f"{b}.img_attn.norm.key_norm.scale"] = ("copy", (f"{t}.attn.norm_k.weight",))
        plan[f"{b}.txt_attn.norm.query_norm.scale"] = ("copy", (f"{t}.attn.norm_added_q.weight",))
        plan[f"{b}.txt_attn.norm.key_norm.scale"] = ("copy", (f"{t}.attn.norm_added_k.weight",))
    for i in range(depth_single):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for p in ("weight", "bias"):
            plan[f"{b}.linear1.{p}"] = ("cat", (*(f"{t}.attn.to_{x}.{p}" for x in "qkv"), f"{t}.proj_mlp.{p}"))
            plan[f"{b}.linear2.{p}"] = ("copy", (f"{t}.proj_out.{p}",))
            plan[f"{b}.modulation.lin.{p}"] = ("copy", (f"{t}.norm.linear.{p}",))
        plan[f"{b}.norm.query_norm.scale"] = ("copy", (f"{t}.attn.norm_q.weight",))
        plan[f"{b}.norm.key_norm.scale"] = ("copy", (f"{t}.attn.norm_k.weight",))
    return plan
