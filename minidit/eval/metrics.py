"""DreamBench's metrics as the papers' community computes them: CLIP-T, CLIP-I and DINO.

    clip = ClipMetric.load("/models/clip-vit-base-patch32")     # an openai/clip-vit-* folder (CLIPModel layout)
    dino = DinoMetric.load("/models/dino-vits16")               # a facebook/dino-vit* folder (ViTModel layout)
    clip_t = cosine(clip.image_features([img]), clip.text_features(["a dog in the jungle"]))
    clip_i = cosine(clip.image_features([img]), clip.image_features([reference]))
    dino_ = cosine(dino.features([img]), dino.features([reference]))

- CLIP-T: cosine of CLIP's projected image feature and projected text feature (DreamBooth, Ruiz et al. 2023;
  the text is the case's prompt, with the class noun and without a unique token; FreeCus' appended subject
  caption is not part of it). CLIP-I: cosine of the
  projected image features of the generated image and the real reference. Both as transformers' `CLIPModel`
  (`get_image_features` / `get_text_features`), the image through `CLIPImageProcessor` exactly: shortest edge to
  224 with PIL bicubic (long edge `int(224·long/short)`), centre crop 224 (offset `(size - 224) // 2`), ×1/255 in
  float64 then float32, CLIP's mean/std — the folder's preprocessor_config.json when it has one. The text goes
  through minidit's CLIP tokenizer (the folder's vocab.json + merges.txt), padded with the end token, which the
  causal text tower never attends to.
- DINO: cosine of the last layer's CLS token (after the final LayerNorm) of a self-supervised DINO ViT, through
  the transform the common DreamBench scripts use (torchvision `Resize(256, BICUBIC)`, `CenterCrop(224)`,
  `ToTensor()`, `Normalize(ImageNet mean, std)`), re-implemented without torchvision: shortest edge to 256 with
  PIL bicubic (long edge `int(256·long/short)`), crop offset `round((size - 224) / 2)`, /255 in float32,
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). NOT the hub folder's preprocessor
  (224 bilinear, 0.5 / 0.5): the output states the transform used.

Defaults named by the harness: CLIP ViT-B/32 (openai/clip-vit-base-patch32) and DINO ViT-S/16
(facebook/dino-vits16), the checkpoints of the common DreamBench scripts; any CLIP (e.g. ViT-L/14) or DINO ViT
folder in the same layouts works. Both load from local folders only, safetensors only, config.json checked as
untrusted input; a folder of the other kind is a one-line error. Images are scored one at a time in float32, so a
score never depends on what else was in the batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..clip import CLIPTextConfig, CLIPTextEncoder
from ..loading import CheckpointError, check_config, load_streaming, open_checkpoint, read_json
from ..tokenizer import CLIPTokenizer
from .vit import ViTConfig, VisionTransformer, dino_rename

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # OpenAI CLIP (transformers' OPENAI_CLIP_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE, DINO_CROP = 256, 224
BICUBIC = 3  # PIL.Image.BICUBIC, the `resample` of CLIP's preprocessor_config.json
SIZE_NAMES = {384: "S", 768: "B", 1024: "L", 1280: "H"}
HINTS = {"clip": "CLIPModel (e.g. openai/clip-vit-base-patch32)", "vit": "ViTModel DINO (e.g. facebook/dino-vits16)"}
DINO_TRANSFORM = ("resize shortest edge 256 bicubic, centre crop 224, ImageNet mean/std "
                  "(the common DreamBench DINO transform, not the hub preprocessor)")


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of (B, D) features (rows already unit-normalised by the metric classes)."""
    return (a * b).sum(-1)


def vit_name(cfg: ViTConfig) -> str:
    """'ViT-B/32', 'ViT-L/14', 'ViT-L/14@336', or 'ViT-32d/16' for a non-standard width."""
    size = SIZE_NAMES.get(cfg.hidden_size, f"{cfg.hidden_size}d")
    return f"ViT-{size}/{cfg.patch_size}" + (f"@{cfg.image_size}" if cfg.image_size != 224 else "")


# ------------------------------------------------------------------------------------------ preprocessing

def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _short_side(img: Image.Image, short: int) -> Image.Image:
    """Shortest edge to `short` with PIL bicubic, the long edge `int(short·long/short_side)` (transformers'
    get_resize_output_image_size and torchvision's Resize(int) compute it the same way)."""
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img.resize(size, Image.BICUBIC)


def clip_pixels(img: Image.Image, size: int = 224, crop: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """CLIPImageProcessor (PIL backend): (3, crop, crop) float32."""
    x = np.array(_short_side(_rgb(img), size))  # (H, W, 3) uint8, a writable copy
    H, W = x.shape[:2]
    if H < crop or W < crop:
        raise ValueError(f"CLIP preprocessing: {W}x{H} after resizing is smaller than the crop {crop}")
    top, left = (H - crop) // 2, (W - crop) // 2
    x = torch.from_numpy(np.ascontiguousarray(x[top:top + crop, left:left + crop])).permute(2, 0, 1)
    x = (x.double() * (1 / 255)).float()  # transformers' rescale: float64 product, then float32
    return (x - torch.tensor(mean, dtype=torch.float32)[:, None, None]) / torch.tensor(std, dtype=torch.float32)[:, None, None]


def dino_pixels(img: Image.Image, resize: int = DINO_RESIZE, crop: int = DINO_CROP) -> Tensor:
    """torchvision Resize(resize, BICUBIC) + CenterCrop(crop) + ToTensor + Normalize(ImageNet): (3, crop, crop)."""
    x = np.array(_short_side(_rgb(img), resize))
    H, W = x.shape[:2]
    top, left = int(round((H - crop) / 2.0)), int(round((W - crop) / 2.0))
    x = torch.from_numpy(np.ascontiguousarray(x[top:top + crop, left:left + crop])).permute(2, 0, 1)
    x = x.float().div(255)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


# ------------------------------------------------------------------------------------------------- loading

def check_folder(folder: Path, flag: str, kind: str, hint: str | None = None) -> dict:
    """folder/config.json of the expected `kind` (model_type "clip" or "vit"), else a one-line error naming the
    flag; read before any model is built."""
    hint = hint or HINTS[kind]
    if not folder.is_dir():
        raise CheckpointError(f"{flag} {folder}: not a folder (give the {hint} folder)")
    d = read_json(folder / "config.json", f"{flag} config")
    found = d.get("model_type")
    if found != kind:
        raise CheckpointError(f"{flag} {folder}: a {found!r} checkpoint, not {kind!r} (give the {hint} folder)")
    return d


def _tensors(folder: Path, flag: str, rename) -> dict[str, Tensor]:
    """All tensors of the folder's safetensors under their module names (rename -> None: skipped)."""
    sd = open_checkpoint(folder)
    out = {}
    for k in sd:
        name = rename(k)
        if name is not None:
            out[name] = sd[k]
    return out


def _build(module: nn.Module, tensors: dict, device, what: str) -> nn.Module:
    load_streaming(module, tensors, device, torch.float32, what=what)
    return module.eval().requires_grad_(False)


class ClipMetric(nn.Module):
    """CLIP's text and vision towers with their projections (transformers' CLIPModel layout)."""

    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: ViTConfig, projection_dim: int):
        super().__init__()
        self.text = CLIPTextEncoder(text_cfg)
        self.vision = VisionTransformer(vision_cfg)
        self.text_projection = nn.Linear(text_cfg.hidden_size, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_cfg.hidden_size, projection_dim, bias=False)
        self.tokenizer: CLIPTokenizer | None = None
        self.size, self.crop, self.mean, self.std = vision_cfg.image_size, vision_cfg.image_size, CLIP_MEAN, CLIP_STD
        self.folder = ""

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", flag: str = "--metric-clip") -> ClipMetric:
        folder = Path(folder)
        d = check_folder(folder, flag, "clip")
        what = f"{flag} {folder}/config.json"
        if not isinstance(d.get("text_config"), dict) or not isinstance(d.get("vision_config"), dict):
            raise CheckpointError(f"{what}: needs text_config and vision_config objects")
        try:
            text_cfg = CLIPTextConfig.from_hf(d["text_config"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{what}: {e}") from None
        vision_cfg = ViTConfig.from_clip(d["vision_config"], what)
        dim = d.get("projection_dim", 512)
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= 1 << 16:
            raise CheckpointError(f"{what}: projection_dim = {dim!r} (must be a positive integer)")
        check_config(text_cfg, what)
        with torch.device("meta"):
            model = cls(text_cfg, vision_cfg, dim)

        def rename(k: str) -> str | None:
            if k == "logit_scale" or k.endswith("embeddings.position_ids"):
                return None  # the contrastive temperature and an arange buffer: unused here
            if k.startswith("vision_model."):
                return "vision." + k.removeprefix("vision_model.")
            return "text." + k if k.startswith("text_model.") else k

        _build(model, _tensors(folder, flag, rename), device, f"{flag} {folder}")
        model.tokenizer = CLIPTokenizer(folder, max_length=text_cfg.max_positions) if (folder / "vocab.json").is_file() \
            else None
        if model.tokenizer is None:
            raise CheckpointError(f"{flag} {folder}: vocab.json and merges.txt (the CLIP tokenizer) are missing")
        model._read_preprocessor(folder / "preprocessor_config.json", flag)
        model.folder = str(folder)
        return model

    def _read_preprocessor(self, file: Path, flag: str) -> None:
        """The folder's CLIPImageProcessor settings (shortest edge, crop, mean, std; bicubic only)."""
        if not file.exists():
            return
        d = read_json(file, f"{flag} preprocessor config")

        def side(v, key):
            v = v.get(key, v.get("height")) if isinstance(v, dict) else v
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 4096:
                raise CheckpointError(f"{flag} {file}: {key} must be a positive integer, got {v!r}")
            return v

        def triple(v, key):
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                  for x in v)) or (key == "image_std" and min(v) <= 0):
                raise CheckpointError(f"{flag} {file}: {key} must be 3 numbers, got {v!r}")
            return tuple(float(x) for x in v)

        if d.get("resample", BICUBIC) != BICUBIC:
            raise CheckpointError(f"{flag} {file}: resample {d.get('resample')!r} (only bicubic, 3, is supported)")
        self.size = side(d.get("size", self.size), "shortest_edge")
        self.crop = side(d.get("crop_size", self.crop), "height")
        self.mean = triple(d.get("image_mean", list(self.mean)), "image_mean")
        self.std = triple(d.get("image_std", list(self.std)), "image_std")
        if self.crop != self.vision.cfg.image_size:
            raise CheckpointError(f"{flag} {file}: crop {self.crop} differs from the model's image_size "
                                  f"{self.vision.cfg.image_size}")

    @property
    def name(self) -> str:
        return f"CLIP {vit_name(self.vision.cfg)}"

    @property
    def transform(self) -> str:
        return (f"resize shortest edge {self.size} bicubic, centre crop {self.crop}, CLIP mean/std "
                "(transformers' CLIPImageProcessor)")

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> Tensor:
        """(B, projection_dim), unit norm, float32 on the CPU."""
        dev = self.visual_projection.weight.device
        x = torch.stack([clip_pixels(im, self.size, self.crop, self.mean, self.std) for im in images]).to(dev)
        return F.normalize(self.visual_projection(self.vision(x)), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(texts).to(self.text_projection.weight.device)
        return F.normalize(self.text_projection(self.text(ids)[1]), dim=-1).cpu()


class DinoMetric(nn.Module):
    """A DINO ViT (transformers' ViTModel layout, facebook/dino-vit*): the last layer's CLS token."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.vit = VisionTransformer(cfg)
        self.folder = ""

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", flag: str = "--metric-dino") -> DinoMetric:
        folder = Path(folder)
        d = check_folder(folder, flag, "vit")
        cfg = ViTConfig.from_vit(d, f"{flag} {folder}/config.json")
        if cfg.image_size != DINO_CROP:
            raise CheckpointError(f"{flag} {folder}: image_size {cfg.image_size}; the DreamBench transform crops "
                                  f"{DINO_CROP} (position embeddings are not interpolated)")
        with torch.device("meta"):
            model = cls(cfg)
        tensors = _tensors(folder, flag, lambda k: (None if dino_rename(k) is None else "vit." + dino_rename(k)))
        # the file's (1, 1, D) cls_token and (1, N + 1, D) position_embeddings; any other shape is named by the load
        for k, shape in (("vit.embeddings.class_embedding", (1, 1, cfg.hidden_size)),
                         ("vit.embeddings.position_embedding.weight", (1, cfg.num_positions, cfg.hidden_size))):
            if k in tensors and tuple(tensors[k].shape) == shape:
                tensors[k] = tensors[k][0, 0] if "class" in k else tensors[k][0]
        _build(model, tensors, device, f"{flag} {folder}")
        model.folder = str(folder)
        return model

    @property
    def name(self) -> str:
        return f"DINO {vit_name(self.vit.cfg)}"

    transform = DINO_TRANSFORM

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> Tensor:
        dev = self.vit.embeddings.patch_embedding.weight.device
        x = torch.stack([dino_pixels(im) for im in images]).to(dev)
        return F.normalize(self.vit(x), dim=-1).cpu()
