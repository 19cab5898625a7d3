"""weights/convert.py: diffusers <-> BFL conversions keep every tensor and the model's outputs."""
import pytest
import torch

from minidit.autoencoder import load_autoencoder
from minidit.flux_loading import load_transformer
from minidit.weights.convert import main
from minidit.weights.tiny_ae import write_tiny_ae
from minidit.weights.tiny_flux import TINY, write_tiny_flux


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transformer_round_trip(tmp_path):
    write_tiny_flux(tmp_path / "transformer", TINY, seed=4, layout="diffusers", dtype=torch.bfloat16)
    main(["transformer", str(tmp_path), str(tmp_path / "flux1-dev.safetensors")])
    main(["transformer", str(tmp_path / "flux1-dev.safetensors"), str(tmp_path / "back"), "--to", "diffusers"])
    a = load_transformer(tmp_path / "transformer", dtype=torch.bfloat16)
    b = load_transformer(tmp_path / "flux1-dev.safetensors", dtype=torch.bfloat16)
    c = load_transformer(tmp_path / "back", dtype=torch.bfloat16)
    assert same_state(a, b) and same_state(a, c)
    from minidit.loading import open_checkpoint
    sd = open_checkpoint(tmp_path / "flux1-dev.safetensors")
    assert sd.dtype("img_in.weight") == torch.bfloat16  # the stored dtype is kept
    assert "double_blocks.0.img_attn.qkv.weight" in sd and sd.metadata()["axes_dim"] == "4,6,6"


def test_ae_to_bfl(tmp_path):
    write_tiny_ae(tmp_path / "vae", seed=2, layout="diffusers")
    main(["ae", str(tmp_path / "vae"), str(tmp_path / "ae.safetensors"), "--dtype", "fp32"])
    write_tiny_ae(tmp_path / "ref.safetensors", seed=2)
    assert same_state(load_autoencoder(tmp_path / "ae.safetensors"), load_autoencoder(tmp_path / "ref.safetensors"))


def test_errors_named(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        main(["transformer", str(tmp_path / "nope"), str(tmp_path / "x.safetensors")])
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(SystemExit, match="refused"):
        main(["transformer", str(tmp_path / "model.ckpt"), str(tmp_path / "x.safetensors")])
