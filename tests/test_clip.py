"""CLIP text encoder: parity with transformers' CLIPTextModel, checkpoint layouts, full-size shapes on meta."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit.clip import CLIPTextConfig, CLIPTextEncoder
from minidit.loading import CheckpointError
from minidit.text_encoder import load_clip
from minidit.weights.tiny_text import write_tiny_clip

transformers = pytest.importorskip("transformers")

BOS, EOS = 49406, 49407


def _hf_model(tmp_path_factory, eos_token_id, act="quick_gelu"):
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                                      num_attention_heads=4, eos_token_id=eos_token_id, hidden_act=act)
    model = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():  # transformers initialises norms to (1, 0): perturb them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(f"clip_{eos_token_id}_{act}")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hf_legacy(tmp_path_factory):
    """eos_token_id=2, as FLUX.1's text_encoder/config.json: pooled at argmax(input_ids)."""
    return _hf_model(tmp_path_factory, 2)


def _ids(L=77, seed=0, eos=EOS):
    """Tokenizer-like rows: BOS, words, EOS, then EOS padding; one row filled to the end without padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BOS, (4, L), generator=g)
    ids[:, 0] = BOS
    for row, end in enumerate([3, L // 2, L - 1, 10]):
        ids[row, end:] = eos
    return ids


@pytest.mark.parametrize("L", [77, 20, 5])
def test_parity_legacy_pooling(hf_legacy, L):
    folder, hf = hf_legacy
    ours = load_clip(folder, dtype=torch.float32)
    assert ours.cfg.eos_token_id == 2
    ids = _ids(L)
    with torch.no_grad():
        ref = hf(ids)
        last, pooled = ours(ids)
    assert last.shape == (4, L, 40) and pooled.shape == (4, 40)
    torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_parity_first_eos_pooling_and_gelu(tmp_path_factory):
    """Newer configs pool at the first eos_token_id; here eos=500 so argmax would pick another position."""
    folder, hf = _hf_model(tmp_path_factory, 500, act="gelu")
    ours = load_clip(folder, dtype=torch.float32)
    ids = _ids(30, eos=500)
    ids[:, 1] = 40000  # larger than the eos id: argmax pooling would be wrong
    with torch.no_grad():
        ref = hf(ids)
        last, pooled = ours(ids)
    torch.testing.assert_close(last, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, last[:, 1])


def test_parity_fp64_exact(hf_legacy):
    folder, _ = hf_legacy
    ours = load_clip(folder, dtype=torch.float64)
    ref = transformers.CLIPTextModel.from_pretrained(folder, dtype=torch.float64).eval()
    ids = _ids()
    with torch.no_grad():
        out, r = ours(ids), ref(ids)
    torch.testing.assert_close(out[0], r.last_hidden_state, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out[1], r.pooler_output, atol=1e-10, rtol=1e-10)


def test_tiny_writer_read_by_both(tmp_path):
    folder = write_tiny_clip(tmp_path / "te")
    assert all(k.startswith("text_model.") for k in load_file(folder / "model.safetensors"))  # FLUX.1's layout
    ours = load_clip(folder, dtype=torch.float32)
    ref, info = transformers.CLIPTextModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = _ids()
    with torch.no_grad():
        r = ref.eval()(ids)
        last, pooled = ours(ids)
    torch.testing.assert_close(last, r.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, r.pooler_output, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "te" / "model.safetensors").read_bytes() == \
        (write_tiny_clip(tmp_path / "again") / "model.safetensors").read_bytes()


def test_position_ids_buffer_ignored(tmp_path):
    folder = write_tiny_clip(tmp_path / "te")
    sd = load_file(folder / "model.safetensors")
    save_file({**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}, folder / "model.safetensors")
    model = load_clip(folder, dtype=torch.float32)
    assert torch.equal(model.text_model.embeddings.position_embedding.weight,
                       sd["text_model.embeddings.position_embedding.weight"])


def test_projection_key_is_unexpected(tmp_path):
    folder = write_tiny_clip(tmp_path / "te")
    sd = load_file(folder / "model.safetensors")
    save_file({**sd, "text_projection.weight": torch.zeros(32, 32)}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys.*text_projection.weight"):
        load_clip(folder)


def test_too_long_input_refused(hf_legacy):
    ours = load_clip(hf_legacy[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="78 tokens"):
        ours(torch.zeros(1, 78, dtype=torch.long))


def _vit_l14_config_dict():
    # openai/clip-vit-large-patch14's text config (FLUX.1's text_encoder/config.json), written out independently
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "bfloat16",
            "vocab_size": 49408}


def test_vit_l14_on_meta_matches_official_layout():
    assert CLIPTextConfig.from_hf(_vit_l14_config_dict()) == CLIPTextConfig.vit_l14()
    with torch.device("meta"):
        ours = CLIPTextEncoder(CLIPTextConfig.vit_l14())
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_vit_l14_config_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    # transformers >= 5 drops the `text_model.` prefix in memory; FLUX.1's file has it
    ref_shapes = {"text_model." + k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert all(p.is_meta for p in ours.parameters())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert abs(n - 123.06e6) < 0.05e6, n
