"""T5 v1.1 encoder (FLUX.1's `text_encoder_2`, google/t5-v1_1-xxl), from scratch.

    x = shared(ids)                                        # (B, L, d_model), no scaling, no positions
    bias = relative_position_bias(L)                       # (1, H, L, L), from block 0, shared by all blocks
    for block: x = x + o(attn(norm(x)) + bias)             # logits q·k with NO 1/sqrt(d) scale
               x = x + wo(gelu_tanh(wi_0(norm(x))) * wi_1(norm(x)))
    out = final_norm(x)

Norms are T5's RMS norm (no mean, no bias): the variance is computed in fp32 and the normalized activations
are cast back to the weight's dtype before the scale, as transformers does. Dropout is omitted (inference only).
Parameter names equal the `T5EncoderModel` checkpoint keys, so loading is a strict `load_state_dict`.

Precision: T5 v1.1 activations overflow float16 (values beyond 65504 in the FF of the XXL model), so float16
is refused; use bfloat16 (FLUX's default) or float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_ff: int = 10240
    num_heads: int = 64
    d_kv: int = 64
    num_layers: int = 24
    num_buckets: int = 32        # relative_attention_num_buckets
    max_distance: int = 128      # relative_attention_max_distance
    eps: float = 1e-6            # layer_norm_epsilon

    @classmethod
    def xxl(cls) -> T5Config:
        """google/t5-v1_1-xxl, the encoder of FLUX.1 (4.76 B parameters)."""
        return cls()

    @classmethod
    def from_hf(cls, d: dict) -> T5Config:
        """From a transformers `T5Config` dict (config.json). Only the gated-GELU (v1.1) encoder is supported."""
        act = d.get("feed_forward_proj", "relu")
        if act not in ("gated-gelu",):
            raise ValueError(f"T5 config: feed_forward_proj={act!r} is not supported; minidit implements the "
                             "T5 v1.1 encoder ('gated-gelu', as in FLUX.1's text_encoder_2)")
        if d.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"T5 config: dense_act_fn={d['dense_act_fn']!r} is not supported (expected gelu_new)")
        try:
            return cls(vocab_size=d["vocab_size"], d_model=d["d_model"], d_ff=d["d_ff"], num_heads=d["num_heads"],
                       d_kv=d["d_kv"], num_layers=d["num_layers"],
                       num_buckets=d.get("relative_attention_num_buckets", 32),
                       max_distance=d.get("relative_attention_max_distance", 128),
                       eps=d.get("layer_norm_epsilon", 1e-6))
        except KeyError as e:
            raise ValueError(f"T5 config is missing the field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """A transformers-readable config.json dict (`T5EncoderModel`)."""
        return {
            "architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": self.d_ff, "d_kv": self.d_kv,
            "d_model": self.d_model, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
            "is_gated_act": True, "layer_norm_epsilon": self.eps, "num_decoder_layers": self.num_layers,
            "num_heads": self.num_heads, "num_layers": self.num_layers, "pad_token_id": 0,
            "relative_attention_max_distance": self.max_distance,
            "relative_attention_num_buckets": self.num_buckets, "tie_word_embeddings": False,
            "torch_dtype": "float32", "use_cache": True, "vocab_size": self.vocab_size,
        }


class T5LayerNorm(nn.Module):
    """RMS norm: x / sqrt(mean(x²) + eps) * w, statistics in fp32, result cast to the weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)  # promotes to fp32
        return self.weight * x.to(self.weight.dtype)


def relative_position_bucket(rel: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Bidirectional T5 buckets for rel = key_pos - query_pos: half the buckets for rel > 0; in each half,
    exact buckets for |rel| < n/4 and logarithmic ones up to max_distance (beyond it, the last bucket)."""
    n = num_buckets // 2
    bucket = (rel > 0).long() * n
    rel = rel.abs()
    exact = n // 2
    log_bucket = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (n - exact)).long()
    log_bucket = log_bucket.clamp(max=n - 1)
    return bucket + torch.where(rel < exact, rel, log_bucket)



class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device: there `normal_` runs a decomposition that
    imports torch._dynamo (~1 s of cold start), and meta-built modules get their weights from a checkpoint."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()

class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = Embedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, L: int, device) -> Tensor:
        """(1, H, L, L) additive logit bias from the relative position of key vs query."""
        pos = torch.arange(L, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        B, L, _ = x.shape
        H, D = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (lin(x).view(B, L, H, D).transpose(1, 2) for lin in (self.q, self.k, self.v))  # (B, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # T5: no 1/√D
        return self.o(out.transpose(1, 2).reshape(B, L, H * D))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)


class T5Encoder(nn.Module):
    """`forward(input_ids (B, L), attention_mask (B, L) of 1/0 or None) -> (B, L, d_model)`.

    With no mask every position (pads included) is attended, which is what FLUX does."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"T5Encoder: input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if self.shared.weight.dtype == torch.float16:
            raise TypeError("T5Encoder: float16 is not supported (T5 v1.1 activations overflow it); "
                            "use torch.bfloat16 or torch.float32")
        L = input_ids.shape[1]
        x = self.shared(input_ids)  # (B, L, d_model)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(L, x.device)  # (1, H, L, L)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"T5Encoder: attention_mask shape {tuple(attention_mask.shape)} != input_ids "
                                 f"shape {tuple(input_ids.shape)}")
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, L)
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)                 # (B, H, L, L)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
