"""Tiny random DreamBench metric checkpoints in their official Hugging Face layouts, for tests and demos.

    write_tiny_clip_model(folder)   -> a CLIPModel folder (openai/clip-vit-base-patch32's layout): config.json,
                                       model.safetensors, preprocessor_config.json, vocab.json + merges.txt
    write_tiny_dino(folder)         -> a ViTModel folder (facebook/dino-vits16's layout): config.json,
                                       model.safetensors (with the unused pooler, as the hub file)

Real geometry (224 px, patch 32 / 16), tiny width, random seeded weights with LayerNorms away from (1, 0), so
both minidit.eval.metrics and transformers read them and the parity tests mean something. The CLIP tokenizer is
the real CLIP vocabulary (clip_tokenizer/). Package code: no transformers import here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidit.clip import CLIPTextConfig
from minidit.eval.metrics import CLIP_MEAN, CLIP_STD, ClipMetric, DinoMetric
from minidit.eval.vit import ViTConfig, dino_hf_name

CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "clip_tokenizer"
TINY_TEXT = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
TINY_CLIP_VISION = ViTConfig(image_size=224, patch_size=32, hidden_size=48, intermediate_size=96, num_layers=2,
                             num_heads=4)
TINY_DINO = ViTConfig(image_size=224, patch_size=16, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                      eps=1e-12, hidden_act="gelu", patch_bias=True, pre_norm=False)
PROJECTION = 24


def _random(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        shape = tuple(p.shape)
        if "norm" in name and name.endswith("weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias") or len(shape) == 1:
            t = 0.2 * torch.randn(shape, generator=g)
        elif "embedding" in name and "patch" not in name:
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        out[name] = t.contiguous()
    return out


def _vision_hf(cfg: ViTConfig) -> dict:
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "layer_norm_eps": cfg.eps, "hidden_act": cfg.hidden_act}


def write_tiny_clip_model(folder: str | Path, seed: int = 0, text: CLIPTextConfig = TINY_TEXT,
                          vision: ViTConfig = TINY_CLIP_VISION, projection_dim: int = PROJECTION) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = ClipMetric(text, vision, projection_dim)
    sd = {}
    for k, v in _random(model, seed).items():
        k = "vision_model." + k.removeprefix("vision.") if k.startswith("vision.") else k.removeprefix("text.")
        sd[k] = v
    sd["logit_scale"] = torch.tensor(2.6592)
    text_hf = {k: v for k, v in text.to_hf().items() if k not in ("architectures", "torch_dtype")}
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection_dim,
              "logit_scale_init_value": 2.6592, "text_config": text_hf, "vision_config": _vision_hf(vision)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    pre = {"crop_size": {"height": vision.image_size, "width": vision.image_size}, "do_center_crop": True,
           "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "image_processor_type": "CLIPImageProcessor",
           "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": vision.image_size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(CLIP_TOKENIZER_DIR / name, folder / name)
    return folder


def write_tiny_dino(folder: str | Path, seed: int = 0, cfg: ViTConfig = TINY_DINO) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = DinoMetric(cfg)
    sd = {dino_hf_name(k.removeprefix("vit.")): v for k, v in _random(model, seed).items()}
    sd["embeddings.cls_token"] = sd["embeddings.cls_token"].reshape(1, 1, -1)
    sd["embeddings.position_embeddings"] = sd["embeddings.position_embeddings"][None].contiguous()
    g = torch.Generator().manual_seed(seed + 1)
    sd["pooler.dense.weight"] = torch.randn(cfg.hidden_size, cfg.hidden_size, generator=g) * 0.1
    sd["pooler.dense.bias"] = torch.zeros(cfg.hidden_size)
    config = {"architectures": ["ViTModel"], "model_type": "vit", "num_channels": 3, "qkv_bias": True,
              "attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0, **_vision_hf(cfg)}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
