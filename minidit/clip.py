"""CLIP ViT-L/14 text encoder (FLUX.1's `text_encoder`, openai/clip-vit-large-patch14), from scratch.

    x = token_embedding(ids) + position_embedding[:L]      # (B, L, 768)
    for layer: x = x + out_proj(causal_attn(ln1(x)))        # pre-LN, causal mask, 1/sqrt(d) scale
               x = x + fc2(quick_gelu(fc1(ln2(x))))        # quick_gelu(x) = x * sigmoid(1.702 x)
    last = final_layer_norm(x)                             # (B, L, 768)
    pooled = last[b, first end-of-text position]           # (B, 768), no projection (FLUX uses this as `vec`)

Parameter names equal the `text_encoder/` checkpoint keys (`text_model.` prefix), so loading is a strict
`load_state_dict`. The pooled position follows transformers' `CLIPTextModel.pooler_output` exactly: with the
legacy `eos_token_id == 2` of the original OpenAI configs (FLUX.1's included) it is `argmax(input_ids)` (the
end token 49407 is the largest id, so its first occurrence), otherwise the first position equal to eos_token_id.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .t5 import Embedding


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_positions: int = 77
    eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2        # FLUX.1's config.json keeps the legacy value 2 (-> argmax pooling)

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """openai/clip-vit-large-patch14's text tower (123 M parameters)."""
        return cls()

    @classmethod
    def from_hf(cls, d: dict) -> CLIPTextConfig:
        """From a transformers `CLIPTextConfig` dict, or a full `CLIPConfig` dict (its `text_config` is used)."""
        if "text_config" in d and "hidden_size" not in d:
            d = d["text_config"]
        act = d.get("hidden_act", "quick_gelu")
        if act not in _ACTS:
            raise ValueError(f"CLIP config: hidden_act={act!r} is not supported (choose one of {sorted(_ACTS)})")
        try:
            return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
                       num_heads=d["num_attention_heads"], max_positions=d.get("max_position_embeddings", 77),
                       eps=d.get("layer_norm_eps", 1e-5), hidden_act=act, eos_token_id=d.get("eos_token_id", 2))
        except KeyError as e:
            raise ValueError(f"CLIP config is missing the field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """A transformers-readable config.json dict (`CLIPTextModel`), with FLUX.1's legacy special ids."""
        return {
            "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "bos_token_id": 0, "dropout": 0.0, "eos_token_id": self.eos_token_id, "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size, "initializer_factor": 1.0, "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size, "layer_norm_eps": self.eps,
            "max_position_embeddings": self.max_positions, "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers, "pad_token_id": 1, "projection_dim": 768,
            "torch_dtype": "float32", "vocab_size": self.vocab_size,
        }


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.causal = cfg.num_heads, causal  # causal: the text tower; not: a ViT (minidit.eval)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_positions, cfg.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)


class CLIPTextEncoder(nn.Module):
    """`forward(input_ids (B, L<=77)) -> (last_hidden (B, L, hidden), pooled (B, hidden))`. No attention mask
    beyond the causal one (FLUX passes none; pads come after the end token, so causality hides them)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        if input_ids.ndim != 2:
            raise ValueError(f"CLIPTextEncoder: input_ids must be (batch, length), got {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if L > self.cfg.max_positions:
            raise ValueError(f"CLIPTextEncoder: {L} tokens > {self.cfg.max_positions} positions")
        tm = self.text_model
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding.weight[:L]
        for layer in tm.encoder.layers:
            x = layer(x)
        last = tm.final_layer_norm(x)  # (B, L, hidden)
        ids = input_ids.to(device=last.device, dtype=torch.int)
        if self.cfg.eos_token_id == 2:  # legacy configs: the end token has the largest id
            pos = ids.argmax(dim=-1)
        else:
            pos = (ids == self.cfg.eos_token_id).int().argmax(dim=-1)
        return last, last[torch.arange(B, device=last.device), pos]
