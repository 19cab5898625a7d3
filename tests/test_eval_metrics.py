"""DreamBench metrics: parity with transformers' CLIPModel / ViTModel (DINO) on tiny random checkpoints in the
official layouts, including the exact preprocessing; wrong or unsafe metric folders are one-line errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minidit.eval.metrics import (IMAGENET_MEAN, IMAGENET_STD, ClipMetric, DinoMetric, clip_pixels, cosine,
                                  dino_pixels)
from minidit.loading import CheckpointError
from minidit.weights.tiny_metrics import write_tiny_clip_model, write_tiny_dino

from conftest import SHARED

transformers = pytest.importorskip("transformers")

PROMPTS = ["a dog in the jungle", "a red backpack with the Eiffel Tower in the background", "a cube shaped teapot"]


def _images():
    """A DreamBench photo (512², JPEG), landscape and portrait images of odd sizes (crop offsets that round
    differently), an image smaller than the crop (upscaled) and a greyscale one."""
    g = np.random.default_rng(0)
    noise = lambda h, w: Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    photo = Image.open(SHARED / "dreambench" / "dog" / "00.jpg").convert("RGB")
    return [photo, noise(301, 517), noise(640, 333), noise(97, 130), photo.resize((389, 250)).convert("L")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return write_tiny_clip_model(root / "clip"), write_tiny_dino(root / "dino")


def test_clip_preprocessing_equals_clip_image_processor(folders):
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)  # the PIL one
    proc = proc_cls.from_pretrained(folders[0])
    ours = ClipMetric.load(folders[0])
    for im in _images():
        ref = torch.from_numpy(proc(images=im.convert("RGB"), return_tensors="np")["pixel_values"][0])
        mine = clip_pixels(im, ours.size, ours.crop, ours.mean, ours.std)
        assert mine.dtype == ref.dtype == torch.float32 and mine.shape == (3, 224, 224)
        assert torch.equal(mine, ref)


def test_clip_features_match_clip_model(folders):
    hf, info = transformers.CLIPModel.from_pretrained(folders[0], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf = hf.eval()
    ours = ClipMetric.load(folders[0])
    proc = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor).from_pretrained(folders[0])
    tok = transformers.CLIPTokenizer(str(folders[0] / "vocab.json"), str(folders[0] / "merges.txt"))
    images = _images()
    with torch.no_grad():
        px = torch.from_numpy(proc(images=[im.convert("RGB") for im in images], return_tensors="np")["pixel_values"])
        ref_img = hf.visual_projection(hf.vision_model(pixel_values=px).pooler_output)
        ids = tok(PROMPTS, padding=True, return_tensors="pt")
        ref_txt = hf.text_projection(hf.text_model(**ids).pooler_output)
    img = torch.cat([ours.image_features([im]) for im in images])
    txt = ours.text_features(PROMPTS)
    torch.testing.assert_close(img, torch.nn.functional.normalize(ref_img, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, torch.nn.functional.normalize(ref_txt, dim=-1), atol=1e-5, rtol=1e-5)
    # CLIP-T and CLIP-I as the cosine of transformers' features
    clip_t = torch.nn.functional.cosine_similarity(ref_img[:3], ref_txt)
    torch.testing.assert_close(cosine(img[:3], txt), clip_t, atol=1e-6, rtol=1e-6)
    clip_i = torch.nn.functional.cosine_similarity(ref_img[1:], ref_img[:1])
    torch.testing.assert_close(cosine(img[1:], img[:1]), clip_i, atol=1e-6, rtol=1e-6)
    assert clip_i.abs().max() < 0.999  # distinct images: the test can tell them apart


def _reference_dino_pixels(im):
    """torchvision's Resize(256, BICUBIC), CenterCrop(224), ToTensor, Normalize(ImageNet), written with PIL and
    numpy only (torchvision's rules: long side int(256·long/short), crop offset round((size - 224) / 2))."""
    im = im.convert("RGB")
    w, h = im.size
    size = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    a = np.asarray(im.resize(size, Image.BICUBIC)).astype(np.float32) / np.float32(255)
    top, left = int(round((a.shape[0] - 224) / 2.0)), int(round((a.shape[1] - 224) / 2.0))
    a = a[top:top + 224, left:left + 224]
    a = (a - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def test_dino_transform_and_features_match_vit_model(folders):
    hf, info = transformers.ViTModel.from_pretrained(folders[1], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf = hf.eval()
    ours = DinoMetric.load(folders[1])
    images = _images()
    ref_px = torch.stack([_reference_dino_pixels(im) for im in images])
    for im, ref in zip(images, ref_px):
        torch.testing.assert_close(dino_pixels(im), ref, atol=1e-6, rtol=0)
    with torch.no_grad():
        cls = hf(pixel_values=ref_px).last_hidden_state[:, 0]
    feats = torch.cat([ours.features([im]) for im in images])
    torch.testing.assert_close(feats, torch.nn.functional.normalize(cls, dim=-1), atol=1e-5, rtol=1e-5)
    dino = torch.nn.functional.cosine_similarity(cls[1:], cls[:1])
    torch.testing.assert_close(cosine(feats[1:], feats[:1]), dino, atol=1e-6, rtol=1e-6)
    assert "256 bicubic" in ours.transform and "ImageNet" in ours.transform


def test_names_state_the_architecture(folders):
    assert ClipMetric.load(folders[0]).name == "CLIP ViT-48d/32"
    assert DinoMetric.load(folders[1]).name == "DINO ViT-48d/16"


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_wrong_kind_is_a_one_line_error(folders):
    clip, dino = folders
    with pytest.raises(CheckpointError) as e:
        ClipMetric.load(dino)
    assert "'vit' checkpoint, not 'clip'" in _one_line(e) and "--metric-clip" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        DinoMetric.load(clip)
    assert "'clip' checkpoint, not 'vit'" in _one_line(e) and "--metric-dino" in _one_line(e)


def test_unsafe_or_broken_folders_refused(tmp_path, folders):
    clip = write_tiny_clip_model(tmp_path / "clip")
    (clip / "model.safetensors").rename(clip / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled files"):
        ClipMetric.load(clip)
    dino = write_tiny_dino(tmp_path / "dino")
    cfg = json.loads((dino / "config.json").read_text())
    (dino / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "12"}))
    with pytest.raises(CheckpointError, match="num_layers = '12'"):
        DinoMetric.load(dino)
    (dino / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match="missing keys"):
        DinoMetric.load(dino)
    with pytest.raises(CheckpointError, match="not a folder"):
        DinoMetric.load(tmp_path / "nothing")
