"""The image towers of the DreamBench metrics, from scratch: CLIP's vision transformer and DINO's ViT.

    x = patch_conv(pixels) -> (B, N, D); x = [cls; x] + pos          # N = (size / patch)², pos (N + 1, D)
    x = pre_norm(x)                                                   # CLIP only (`pre_layrnorm`)
    for layer: x = x + out_proj(attn(ln1(x))); x = x + fc2(act(fc1(ln2(x))))   # pre-LN, full attention
    feature = final_norm(x[:, 0])                                      # the CLS token of the last layer

Both are the same pre-LN ViT, and its layer is exactly minidit.clip.CLIPEncoderLayer without the causal mask
(q/k/v/out projections with biases, 1/sqrt(d) scale, LayerNorm before attention and MLP). They differ only in
details the config names: CLIP (transformers' `CLIPVisionTransformer`) has a bias-free patch convolution, a
LayerNorm before the first layer (`pre_layrnorm`) and quick_gelu; DINO (transformers' `ViTModel`, the
facebook/dino-vit* checkpoints) has a patch bias, no pre-norm, exact gelu and eps 1e-12. DINO's final LayerNorm
runs on every token, CLIP's `post_layernorm` on the CLS token only: per-token, so the CLS output is the same.

Why from scratch rather than an `[eval]` extra (open_clip / timm / transformers): the towers are ~100 lines
on top of minidit's CLIP layer, read the official Hugging Face folders directly (safetensors only, config.json
checked as untrusted input) and keep the generation path free of a second model library; parity with
transformers' CLIPModel / ViTModel is tested on tiny random checkpoints (tests/test_eval_metrics.py).

Parameter names follow transformers' CLIP vision layout (`embeddings.class_embedding`, `pre_layrnorm`,
`encoder.layers.N.self_attn.q_proj`, `post_layernorm`); DINO's `ViTModel` names are renamed to them on load
(`dino_rename`), `pooler.*` (unused by the metric) is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..clip import CLIPEncoderLayer
from ..loading import CheckpointError, check_config

ACTS = ("quick_gelu", "gelu", "gelu_new")


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    patch_bias: bool = False      # DINO: True
    pre_norm: bool = True         # CLIP's pre_layrnorm; DINO: False

    @classmethod
    def from_clip(cls, d: dict, what: str) -> ViTConfig:
        """From a CLIPConfig dict's `vision_config` (transformers' CLIPVisionConfig fields)."""
        return cls._from(d, what, "quick_gelu", 1e-5, patch_bias=False, pre_norm=True)

    @classmethod
    def from_vit(cls, d: dict, what: str) -> ViTConfig:
        """From a ViTConfig dict (facebook/dino-vits16's config.json)."""
        if d.get("num_channels", 3) != 3 or d.get("qkv_bias", True) is not True:
            raise CheckpointError(f"{what}: only 3 channels with q/k/v biases are supported (num_channels="
                                  f"{d.get('num_channels')!r}, qkv_bias={d.get('qkv_bias')!r})")
        return cls._from(d, what, "gelu", 1e-12, patch_bias=True, pre_norm=False)

    @classmethod
    def _from(cls, d: dict, what: str, act: str, eps: float, **fixed) -> ViTConfig:
        if not isinstance(d, dict):
            raise CheckpointError(f"{what}: the vision config must be a JSON object")
        try:
            cfg = cls(image_size=d["image_size"], patch_size=d["patch_size"], hidden_size=d["hidden_size"],
                      intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                      num_heads=d["num_attention_heads"], eps=d.get("layer_norm_eps", eps),
                      hidden_act=d.get("hidden_act", act), **fixed)
        except KeyError as e:
            raise CheckpointError(f"{what}: the config is missing the field {e.args[0]!r}") from None
        for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CheckpointError(f"{what}: config {name} = {v!r} (must be a positive integer)")
        if not isinstance(cfg.eps, (int, float)) or isinstance(cfg.eps, bool):
            raise CheckpointError(f"{what}: config layer_norm_eps = {cfg.eps!r} (must be a number)")
        if cfg.hidden_act not in ACTS:
            raise CheckpointError(f"{what}: hidden_act={cfg.hidden_act!r} is not supported (one of {ACTS})")
        if cfg.image_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads:
            raise CheckpointError(f"{what}: image_size must be a multiple of patch_size and hidden_size of "
                                  f"num_attention_heads, got {cfg.image_size}/{cfg.patch_size}, "
                                  f"{cfg.hidden_size}/{cfg.num_heads}")
        check_config(cfg, what)  # every int in range, eps finite and positive
        return cfg

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (B, N + 1, D)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.num_layers)])


class VisionTransformer(nn.Module):
    """`forward(pixels (B, 3, S, S)) -> (B, D)`: the final-normed CLS token of the last layer."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ViTEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps) if cfg.pre_norm else nn.Identity()
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, pixels: Tensor) -> Tensor:
        S = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"VisionTransformer: pixels must be (B, 3, {S}, {S}), got {tuple(pixels.shape)}")
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


# ------------------------------------------------------------------------------------- DINO's ViTModel names

DINO_LAYER = (("layernorm_before.", "layer_norm1."), ("layernorm_after.", "layer_norm2."),
              ("attention.attention.query.", "self_attn.q_proj."), ("attention.attention.key.", "self_attn.k_proj."),
              ("attention.attention.value.", "self_attn.v_proj."), ("attention.output.dense.", "self_attn.out_proj."),
              ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."))
DINO_TOP = {"embeddings.cls_token": "embeddings.class_embedding",
            "embeddings.position_embeddings": "embeddings.position_embedding.weight",
            "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
            "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
            "layernorm.weight": "post_layernorm.weight", "layernorm.bias": "post_layernorm.bias"}


def dino_rename(key: str) -> str | None:
    """A transformers ViTModel key -> this module's name; None for keys the metric does not use (pooler)."""
    if key.startswith("pooler."):
        return None
    if key in DINO_TOP:
        return DINO_TOP[key]
    if key.startswith("encoder.layer."):
        index, rest = key.removeprefix("encoder.layer.").split(".", 1)
        for old, new in DINO_LAYER:
            if rest.startswith(old):
                return f"encoder.layers.{index}.{new}{rest.removeprefix(old)}"
    return key  # unknown: left as is, so the strict load names it


def dino_hf_name(name: str) -> str:
    """The inverse of `dino_rename` (writes tiny checkpoints in the official layout)."""
    top = {v: k for k, v in DINO_TOP.items()}
    if name in top:
        return top[name]
    index, rest = name.removeprefix("encoder.layers.").split(".", 1)
    for old, new in DINO_LAYER:
        if rest.startswith(new):
            return f"encoder.layer.{index}.{old}{rest.removeprefix(new)}"
    raise KeyError(name)
