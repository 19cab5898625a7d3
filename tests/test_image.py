"""Image and mask helpers: conversions against diffusers' VaeImageProcessor, size checks and fits, masks."""
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from minidit.image import check_size, fit_image, load_image, load_mask, pil_to_tensor, tensor_to_pil


def _rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_pil_to_tensor_matches_diffusers():
    img = _rgb(32, 48)
    x = pil_to_tensor(img)
    ref = VaeImageProcessor(vae_scale_factor=16).preprocess(img)  # FLUX img2img's processor (8 * 2)
    assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref, atol=0, rtol=0)
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensor_to_pil_matches_diffusers(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 24, generator=g) * 0.9
    x[0, 0, 0, :6] = torch.tensor([-3.0, 3.0, -1.0, 1.0, 0.5 / 127.5 - 1, 1.5 / 127.5 - 1])  # clamps, .5 rounding
    x = x.to(dtype)
    ours = tensor_to_pil(x)
    ref = VaeImageProcessor(vae_scale_factor=16).postprocess(x, output_type="pil")
    assert len(ours) == 2 and ours[0].size == (24, 16) and ours[0].mode == "RGB"
    for a, b in zip(ours, ref, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(ours[0])[0, :4, 0].tolist() == [0, 255, 0, 255]
    assert len(tensor_to_pil(x[0])) == 1  # (3, H, W) accepted
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 24\)"):
        tensor_to_pil(torch.zeros(2, 4, 16, 24))


def test_round_trip_is_exact():
    img = _rgb(16, 32, seed=3)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(img))[0]), np.asarray(img))


def test_check_size():
    check_size(512, 768)
    with pytest.raises(ValueError, match="500x512"):
        check_size(500, 512)
    with pytest.raises(ValueError, match="512x520"):
        check_size(512, 520)


def test_load_image_fits(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(np.asarray(_rgb(50, 70)), "RGB").convert("RGBA").save(path)
    with pytest.raises(ValueError, match="50x70"):
        load_image(path)
    img = load_image(path, fit="resize")
    assert img.mode == "RGB" and (img.height, img.width) == (48, 64)  # nearest multiples of 16
    crop = load_image(path, fit="crop")
    assert (crop.height, crop.width) == (48, 64)
    src = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(crop), src[1:49, 3:67])  # centred: (50-48)//2, (70-64)//2
    sized = load_image(_rgb(40, 40).convert("L"), size=(32, 64))  # PIL input, greyscale -> RGB, (height, width)
    assert sized.mode == "RGB" and (sized.height, sized.width) == (32, 64)
    assert load_image(path, size=(40, 40), fit="resize").size == (48, 48)  # 40 -> nearest multiple 48
    assert fit_image(_rgb(8, 40), fit="resize").size == (48, 16)  # never below 16
    with pytest.raises(ValueError, match="too small"):
        fit_image(_rgb(8, 40), fit="crop")
    with pytest.raises(ValueError, match="fit must be one of"):
        load_image(path, fit="pad")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")


def test_load_mask(tmp_path):
    m = np.zeros((32, 48), np.uint8)
    m[8:24, 16:40] = 255
    m[0, 0] = 128
    path = tmp_path / "m.png"
    Image.fromarray(m, "L").save(path)
    mask = load_mask(path, (32, 48))
    assert mask.shape == (32, 48) and mask.dtype == torch.float32
    assert mask[8:24, 16:40].eq(1).all() and mask[1:8].eq(0).all() and mask[0, 0].item() == pytest.approx(128 / 255)
    rgb = Image.fromarray(np.stack([m] * 3, -1), "RGB")  # PIL RGB -> greyscale
    assert torch.equal(load_mask(rgb, (32, 48)), mask)
    assert torch.equal(load_mask(torch.from_numpy(m), (32, 48)), mask)  # uint8
    binary = torch.from_numpy(m == 255)
    assert torch.equal(load_mask(binary[None, None], (32, 48)), binary.float())  # (1, 1, H, W) bool
    assert torch.equal(load_mask(mask[None], (32, 48)), mask)  # (1, H, W) float
    with pytest.raises(ValueError, match="mask size 32x48 .* image size 32x64"):
        load_mask(path, (32, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_mask(mask * 2, (32, 48))
    with pytest.raises(ValueError, match=r"\(2, 32, 48\)"):
        load_mask(torch.zeros(2, 32, 48), (32, 48))
    with pytest.raises(FileNotFoundError, match="mask not found"):
        load_mask(tmp_path / "nope.png", (32, 48))
