"""The FLUX autoencoder against diffusers' AutoencoderKL (the oracle), both checkpoint layouts, errors, the full-size
layout on meta, tiling and posterior sampling. Tiny random weights only; no hub access."""
import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from minidit import autoencoder, tiling
from minidit.autoencoder import AutoEncoder, AutoEncoderConfig, load_autoencoder
from minidit.loading import CheckpointError
from minidit.weights.tiny_ae import diffusers_config, tiny_ae_state_dict, write_tiny_ae

SCALE, SHIFT = 0.3611, 0.1159
TOL = dict(atol=1e-5, rtol=1e-5)

# FLUX.1's vae/config.json, written out here so the meta test does not depend on minidit's own writer
FLUX_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    return {"bfl": write_tiny_ae(root / "bfl" / "ae.safetensors"),
            "diffusers": write_tiny_ae(root / "repo" / "vae", layout="diffusers")}


@pytest.fixture(scope="module")
def ae(files):
    return load_autoencoder(files["bfl"])


@pytest.fixture(scope="module")
def oracle(files):
    """diffusers' AutoencoderKL holding the BFL file's weights, converted by diffusers' own converter."""
    cfg = diffusers_config(AutoEncoderConfig.tiny())
    vae = AutoencoderKL.from_config(cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(files["bfl"]), cfg), strict=True)
    return vae.eval()


def _images(b, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, max(h // 8, 1), max(w // 8, 1), generator=g) * 2 - 1  # smooth + noise, in [-1, 1]
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")
    return (x + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("h,w", [(64, 64), (48, 80)])
def test_encode_matches_diffusers(ae, oracle, h, w):
    x = _images(2, h, w)
    with torch.no_grad():
        ours = ae.encode(x)
        ref = (oracle.encode(x).latent_dist.mean - SHIFT) * SCALE  # what FluxPipeline does
    assert ours.shape == (2, 16, h // 8, w // 8)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_decode_matches_diffusers(ae, oracle, h, w):
    z = torch.randn(2, 16, h, w)
    with torch.no_grad():
        ours = ae.decode(z)
        ref = oracle.decode(z / SCALE + SHIFT).sample  # FluxPipeline's un-normalisation, then diffusers' decoder
    assert ours.shape == (2, 3, 8 * h, 8 * w)
    assert ours.abs().max() > 1  # unclamped, like diffusers' vae.decode
    torch.testing.assert_close(ours, ref, **TOL)


def test_posterior_sample_reproducible_and_matches_diffusers(ae, oracle):
    x = _images(2, 32, 48)
    with torch.no_grad():
        a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        c = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
        mean = ae.encode(x)
        ref = (oracle.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7)) - SHIFT) * SCALE
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3 and (a - mean).abs().max() > 1e-3
    torch.testing.assert_close(a, ref, **TOL)


def test_diffusers_folder_is_read_by_diffusers_and_minidit(files, ae, oracle):
    """The diffusers-layout writer is checked by diffusers itself; minidit reads it into the same weights."""
    vae = AutoencoderKL.from_pretrained(files["diffusers"]).eval()
    z = torch.randn(1, 16, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, oracle.decode(z).sample, atol=0, rtol=0)
    other = load_autoencoder(files["diffusers"])
    assert other.cfg == ae.cfg
    sd, ref = other.state_dict(), ae.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    x = _images(1, 32, 32)
    with torch.no_grad():
        assert torch.equal(other.encode(x), ae.encode(x)) and torch.equal(other.decode(z), ae.decode(z))


def test_repository_roots(files):
    assert load_autoencoder(files["diffusers"].parent).cfg == AutoEncoderConfig.tiny()  # root with vae/ only
    assert load_autoencoder(files["bfl"].parent).cfg == AutoEncoderConfig.tiny()  # root with ae.safetensors
    ae16 = load_autoencoder(files["bfl"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ae16.parameters())
    with torch.no_grad():
        assert ae16.decode(torch.randn(1, 16, 4, 4)).dtype == torch.bfloat16


def test_tiny_writer_is_deterministic():
    a, b, c = tiny_ae_state_dict(seed=0), tiny_ae_state_dict(seed=0), tiny_ae_state_dict(seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.conv_out.weight"], c["decoder.conv_out.weight"])
    assert diffusers_config(AutoEncoderConfig.tiny())["block_out_channels"] == [32, 32, 64, 64]


# ----------------------------------------------------------------------------------------- full size, meta
def test_full_size_layout_on_meta():
    with torch.device("meta"):
        ours = AutoEncoder(AutoEncoderConfig.flux())
        ref = AutoencoderKL(**FLUX_VAE_CONFIG)
    sd = ours.state_dict()
    assert all(t.is_meta for t in sd.values())  # nothing allocated
    n = sum(t.numel() for t in sd.values())
    assert n == sum(p.numel() for p in ref.parameters()) and round(n / 1e6, 1) == 83.8
    converted = convert_ldm_vae_checkpoint(sd, FLUX_VAE_CONFIG)  # official names -> diffusers, by diffusers
    expected = ref.state_dict()
    assert len(converted) == len(sd) and converted.keys() == expected.keys()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    # a few official names spelled out (decoder.up.0 is the highest-resolution level, as in ae.safetensors)
    assert tuple(sd["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(sd["decoder.up.3.upsample.conv.weight"].shape) == (512, 512, 3, 3)
    assert tuple(sd["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert tuple(sd["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert AutoEncoderConfig.from_checkpoint(sd) == AutoEncoderConfig.flux()


# ------------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize("b,h,w,tile", [(2, 128, 96, 32), (1, 256, 128, 32), (1, 80, 112, 48)])
def test_tiled_matches_untiled(ae, b, h, w, tile, monkeypatch):
    x = _images(b, h, w)
    calls = []  # per map_tiles call: (input side, crop sides)
    real = tiling.map_tiles

    def spy(fn, t, tile, halo, **kw):
        crops = []
        calls.append((tuple(t.shape[-2:]), crops))
        return real(lambda c: crops.append(tuple(c.shape[-2:])) or fn(c), t, tile, halo, **kw)
    with torch.no_grad():
        z, y = ae.encode(x), ae.decode(ae.encode(x))
        monkeypatch.setattr(autoencoder, "map_tiles", spy)
        monkeypatch.setattr(tiling, "map_tiles", spy)
        zt = ae.encode(x, tile=tile)
        yt = ae.decode(z, tile=tile)
    # really tiled: the decoder's last layer (conv_out, halo 1) ran on ceil(h/tile) x ceil(w/tile) crops, each at
    # most tile + 2 a side; the (80, 112, 48) case has partial last tiles (80 = 48 + 32, 112 = 48 + 48 + 16)
    side, crops = calls[-1]
    assert side == (h, w) and len(crops) == -(-h // tile) * -(-w // tile)
    assert all(r <= tile + 2 and c <= tile + 2 for r, c in crops)
    # measured: max abs diff ~1e-6 (latents, magnitude ~1) and ~5e-6 (images, magnitude ~5)
    torch.testing.assert_close(zt, z, **TOL)
    torch.testing.assert_close(yt, y, **TOL)


def test_tiling_halo_and_statistics_matter(ae, monkeypatch):
    """Controls for the test above: without the halo the crops' padded edges show; with each crop's own
    GroupNorm statistics (as diffusers' tiling) the result changes too."""
    z = torch.randn(1, 16, 10, 14)
    real_map = tiling.map_tiles
    no_halo = lambda fn, x, tile, halo, **kw: real_map(fn, x, tile, 0, **kw)  # noqa: E731
    with torch.no_grad():
        y = ae.decode(z)
        assert (ae.decode(z, tile=48) - y).abs().max() < 1e-5
        monkeypatch.setattr(autoencoder, "map_tiles", no_halo)
        monkeypatch.setattr(tiling, "map_tiles", no_halo)
        assert (ae.decode(z, tile=48) - y).abs().max() > 1e-3
        monkeypatch.setattr(autoencoder, "map_tiles", real_map)
        monkeypatch.setattr(tiling, "map_tiles", real_map)
        monkeypatch.setattr(autoencoder, "group_norm", lambda mod, m, h: mod(h))
        monkeypatch.setattr(tiling, "group_norm", lambda mod, m, h: mod(h))
        assert (ae.decode(z, tile=48) - y).abs().max() > 1e-3


def test_tiling_errors(ae):
    with torch.no_grad(), pytest.raises(ValueError, match="multiple of 8"):
        ae.decode(torch.randn(1, 16, 8, 8), tile=60)
    with pytest.raises(RuntimeError, match="no_grad"):
        ae.decode(torch.randn(1, 16, 8, 8, requires_grad=True), tile=32)


# ------------------------------------------------------------------------------------------------- errors
def test_bad_inputs(ae):
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"multiples of 8.*\(1, 3, 36, 40\)"):
            ae.encode(torch.zeros(1, 3, 36, 40))
        with pytest.raises(ValueError, match=r"\(1, 4, 32, 32\)"):
            ae.encode(torch.zeros(1, 4, 32, 32))
        with pytest.raises(ValueError, match=r"\(1, 4, 8, 8\)"):
            ae.decode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoEncoder(AutoEncoderConfig(ch=16, ch_mult=(1, 2)))


def test_checkpoint_errors(files, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "nope" / "ae.safetensors")
    pickled = tmp_path / "ae.ckpt"
    pickled.write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickled"):
        load_autoencoder(pickled)
    vae_bin = tmp_path / "vae_bin"
    vae_bin.mkdir()
    (vae_bin / "config.json").write_text(json.dumps(diffusers_config(AutoEncoderConfig.tiny())))
    (vae_bin / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled"):
        load_autoencoder(vae_bin)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no ae.safetensors"):
        load_autoencoder(empty)

    sd = load_file(files["bfl"])

    def write(name, d):
        save_file(d, str(tmp_path / name))
        return tmp_path / name

    missing = {k: v for k, v in sd.items() if k != "decoder.mid.attn_1.k.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decoder\.mid\.attn_1\.k\.bias"):
        load_autoencoder(write("missing.safetensors", missing))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): encoder\.extra\.weight"):
        load_autoencoder(write("extra.safetensors", {**sd, "encoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): decoder\.conv_in\.bias"):
        load_autoencoder(write("shape.safetensors", {**sd, "decoder.conv_in.bias": torch.zeros(63)}))
    with pytest.raises(CheckpointError, match="not a FLUX autoencoder"):
        load_autoencoder(write("other.safetensors", {"model.weight": torch.zeros(2)}))


def test_diffusers_layout_errors(files, tmp_path):
    import shutil
    folder = shutil.copytree(files["diffusers"], tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if k != "decoder.up_blocks.0.upsamplers.0.conv.bias"}, str(weights))
    # reported under its ae.safetensors name: diffusers' up_blocks.0 is BFL's up.3
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decoder\.up\.3\.upsample\.conv\.bias"):
        load_autoencoder(folder)
    save_file({**sd, "quant_conv.weight": torch.zeros(32, 32, 1, 1)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): quant_conv\.weight"):
        load_autoencoder(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "use_quant_conv": True}))
    with pytest.raises(CheckpointError, match="quant"):
        load_autoencoder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_autoencoder(folder)
