"""The FLUX.1 family's transformers: variant from img_in's width (and Kontext's name), every official layout,
parity with diffusers at the wider inputs, full-size structure on `meta`."""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert
from test_transformer import inputs, run_diffusers, run_minidit

from minidit.loading import CheckpointError
from minidit.flux_loading import find_transformer, load_transformer
from minidit.transformer import Flux, FluxConfig
from minidit.weights.tiny_flux import TINY, VARIANTS, random_state_dict, save_bfl, write_tiny_variant

EXPECTED = {"dev": ("dev", 64), "schnell": ("schnell", 64), "fill": ("fill", 384), "depth": ("control", 128),
            "canny": ("control", 128), "kontext": ("kontext", 64)}


@pytest.mark.parametrize("layout", ["bfl", "comfyui", "diffusers"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_detected_in_every_layout(tmp_path, variant, layout):
    written = write_tiny_variant(tmp_path / "repo", variant, layout=layout, seed=3)
    m = load_transformer(tmp_path / "repo", "cpu", torch.float32)  # the repository root, as a user gives it
    assert (m.cfg.variant, m.cfg.in_channels, m.cfg.out_channels) == (*EXPECTED[variant], 64)
    if layout != "diffusers":
        assert written.name == f"{VARIANTS[variant][0]}.safetensors" and find_transformer(tmp_path / "repo") == written


@pytest.mark.parametrize("variant", ["fill", "depth"])
def test_wide_inputs_match_diffusers(tmp_path, variant):
    """The same tiny weights in the BFL file and the diffusers folder: minidit on the file, diffusers'
    FluxTransformer2DModel on the folder, at img_in widths 384 / 128."""
    write_tiny_variant(tmp_path / "bfl", variant, seed=2)
    folder = write_tiny_variant(tmp_path / "hf", variant, layout="diffusers", seed=2)
    ours = load_transformer(tmp_path / "bfl", "cpu", torch.float32)
    oracle = FluxTransformer2DModel.from_pretrained(folder).eval()
    x = inputs(ours.cfg, 2, 3, 4, 6)
    assert x["img"].shape[-1] == EXPECTED[variant][1]
    with torch.no_grad():
        a, b = run_minidit(ours, x, 2), run_diffusers(oracle, x, True)
    assert a.shape == (2, 12, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kontext_is_told_by_name_only_inside_the_given_folder(tmp_path):
    """Kontext has dev's shapes: a file named flux1-kontext-dev*, or the model_index.json of a diffusers root.
    Given the transformer/ folder itself, minidit does not read its parent's model_index.json: dev."""
    folder = write_tiny_variant(tmp_path / "hf", "kontext", layout="diffusers")
    assert load_transformer(tmp_path / "hf", "cpu").cfg.variant == "kontext"
    assert load_transformer(folder, "cpu").cfg.variant == "dev"
    sd = random_state_dict(TINY)
    comfy = save_bfl({f"model.diffusion_model.{k}": v for k, v in sd.items()}, TINY,
                     tmp_path / "flux1-dev-kontext_fp8_scaled.safetensors")
    assert load_transformer(comfy, "cpu").cfg.variant == "kontext"


def test_lora_files_are_not_the_transformer(tmp_path):
    write_tiny_variant(tmp_path, "depth")
    (tmp_path / "flux1-depth-dev-lora.safetensors").write_bytes(b"")
    (tmp_path / "flux1-canny-dev-lora.safetensors").write_bytes(b"")
    assert find_transformer(tmp_path) == tmp_path / "flux1-depth-dev.safetensors"
    (tmp_path / "flux1-depth-dev.safetensors").unlink()
    assert find_transformer(tmp_path) is None


def test_unknown_img_in_width_is_a_named_error(tmp_path):
    import dataclasses
    cfg = dataclasses.replace(TINY, in_channels=96)
    path = save_bfl(random_state_dict(cfg), cfg, tmp_path / "flux1-odd.safetensors")
    with pytest.raises(CheckpointError, match=r"flux1-odd.safetensors: img_in takes 96 channels, none of FLUX.1's"):
        load_transformer(path, "cpu")


# ------------------------------------------------------------------------------------------- full size, meta

DEV_PARAMS = 11_901_408_320


@pytest.mark.parametrize("preset,width", [("flux-fill", 384), ("flux-control", 128), ("flux-kontext", 64)])
def test_full_size_structure_on_meta(preset, width):
    """Each family member's full-size tensors on `meta` equal diffusers' published FluxTransformer2DModel at
    in_channels=width, out_channels=64 (mapped through diffusers' own BFL->diffusers converter)."""
    cfg = FluxConfig.preset(preset)
    with torch.device("meta"):
        ours = Flux(cfg)
        theirs = FluxTransformer2DModel(patch_size=1, in_channels=width, out_channels=64, num_layers=19,
                                        num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                        axes_dims_rope=(16, 56, 56))
    sd = ours.state_dict()
    assert {k: tuple(v.shape) for k, v in convert(dict(sd)).items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sd["img_in.weight"].shape == (3072, width) and sd["final_layer.linear.weight"].shape == (64, 3072)
    assert sum(p.numel() for p in ours.parameters()) == DEV_PARAMS + (width - 64) * 3072
    inferred = FluxConfig.from_checkpoint({k: tuple(v.shape) for k, v in sd.items()})
    assert inferred.variant == ("dev" if preset == "flux-kontext" else cfg.variant)  # Kontext: by name only
