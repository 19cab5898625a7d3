"""T5 v1.1 encoder: parity with transformers' T5EncoderModel, checkpoint layouts, full-size shapes on meta."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit.loading import CheckpointError
from minidit.t5 import T5Config, T5Encoder, relative_position_bucket
from minidit.text_encoder import load_t5
from minidit.weights.tiny_text import write_tiny_t5

transformers = pytest.importorskip("transformers")

# small, but with a bucket range that long test sequences exceed (log buckets and the clamp are exercised)
HF_CFG = dict(vocab_size=300, d_model=48, d_ff=80, d_kv=12, num_heads=4, num_layers=3,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers T5EncoderModel saved sharded (like FLUX.1's text_encoder_2/), norms perturbed."""
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**HF_CFG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("t5_hf")
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder, model


def _ids(B=3, L=40, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    ids[1, 25:] = 0  # trailing padding, as the tokenizer writes it
    ids[2, 6:] = 0
    return ids, (ids != 0).long()


def test_saved_sharded(hf_folder):
    folder, _ = hf_folder
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2


@pytest.mark.parametrize("L", [1, 7, 40])
def test_parity_fp32(hf_folder, L):
    folder, hf = hf_folder
    ours = load_t5(folder, dtype=torch.float32)
    ids, mask = _ids()
    with torch.no_grad():
        for m in (None, mask):
            m = None if m is None else m[:, :L]
            ref = hf(ids[:, :L], attention_mask=m).last_hidden_state
            out = ours(ids[:, :L], m)
            assert out.shape == ref.shape == (3, L, 48)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_parity_fp64_exact(hf_folder):
    """In float64 the two implementations agree to rounding: same math, not just close."""
    folder, _ = hf_folder
    ours = load_t5(folder, dtype=torch.float64)
    ref_model = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.float64).eval()
    ids, mask = _ids(L=60)
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(ours(ids, m), ref_model(ids, attention_mask=m).last_hidden_state,
                                       atol=1e-10, rtol=1e-10)


def test_padding_is_attended_without_mask(hf_folder):
    """FLUX passes no mask: the pads change the states of the real tokens, a mask removes their effect."""
    folder, _ = hf_folder
    ours = load_t5(folder, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 1] + [0] * 12])
    with torch.no_grad():
        short = ours(ids[:, :4])
        no_mask = ours(ids)[:, :4]
        masked = ours(ids, (ids != 0).long())[:, :4]
    assert (no_mask - short).abs().max() > 1e-3
    torch.testing.assert_close(masked, short, atol=1e-5, rtol=1e-5)


def test_bf16_close_to_transformers_bf16(hf_folder):
    folder, _ = hf_folder
    ours = load_t5(folder, dtype=torch.bfloat16)
    assert ours.shared.weight.dtype == torch.bfloat16
    ref = transformers.T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids, _ = _ids()
    with torch.no_grad():
        a, b = ours(ids).float(), ref(ids).last_hidden_state.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("buckets,dist", [(32, 128), (8, 20), (16, 40)])
def test_relative_position_bucket(buckets, dist):
    rel = torch.arange(-300, 301)[None, :]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=buckets, max_distance=dist)
    assert torch.equal(relative_position_bucket(rel, buckets, dist), ref)


def test_fp16_refused(hf_folder):
    folder, _ = hf_folder
    with pytest.raises(ValueError, match="float16"):
        load_t5(folder, dtype=torch.float16)
    model = load_t5(folder, dtype=torch.float32).half()
    with pytest.raises(TypeError, match="float16"):
        model(torch.tensor([[1]]))


def test_tiny_writer_read_by_both(tmp_path):
    folder = write_tiny_t5(tmp_path / "te2", shards=3)
    assert len(list(folder.glob("model-0000?-of-00003.safetensors"))) == 3
    ours = load_t5(folder, dtype=torch.float32)
    ref, info = transformers.T5EncoderModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref.eval()(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    # deterministic for a seed
    again = write_tiny_t5(tmp_path / "again", shards=3)
    for f in folder.glob("*.safetensors"):
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_tied_embed_tokens_key(tmp_path):
    """Files written by older transformers carry encoder.embed_tokens.weight too."""
    folder = write_tiny_t5(tmp_path / "t", shards=1)
    file = folder / "model-00001-of-00001.safetensors"
    sd = load_file(file)
    ref = load_t5(folder, dtype=torch.float32).shared.weight

    save_file({**sd, "encoder.embed_tokens.weight": sd["shared.weight"].clone()}, file)
    _reindex(folder)
    assert torch.equal(load_t5(folder, dtype=torch.float32).shared.weight, ref)      # tied duplicate: dropped

    only = {k: v for k, v in sd.items() if k != "shared.weight"}
    save_file({**only, "encoder.embed_tokens.weight": sd["shared.weight"]}, file)
    _reindex(folder)
    assert torch.equal(load_t5(folder, dtype=torch.float32).shared.weight, ref)      # used as shared.weight

    save_file({**sd, "encoder.embed_tokens.weight": sd["shared.weight"] + 1}, file)
    _reindex(folder)
    with pytest.raises(CheckpointError, match="differs from shared.weight"):
        load_t5(folder, dtype=torch.float32)


def _reindex(folder):
    from safetensors import safe_open
    index = {"metadata": {}, "weight_map": {}}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            index["weight_map"].update({k: f.name for k in h.keys()})  # noqa: SIM118 (a safe_open handle)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_single_file_with_config(tmp_path):
    folder = write_tiny_t5(tmp_path / "t", shards=1)
    file = folder / "model-00001-of-00001.safetensors"
    with pytest.raises(CheckpointError, match="config"):
        load_t5(file)
    a = load_t5(file, dtype=torch.float32, config=json.loads((folder / "config.json").read_text()))
    b = load_t5(file, dtype=torch.float32, config=folder / "config.json")
    assert torch.equal(a.shared.weight, b.shared.weight)


def _xxl_config_dict():
    # google/t5-v1_1-xxl's config.json fields (FLUX.1's text_encoder_2/config.json), written out independently
    return {"architectures": ["T5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
            "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_encoder_decoder": True,
            "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": 24,
            "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
            "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32128}


def test_xxl_on_meta_matches_official_layout():
    assert T5Config.from_hf(_xxl_config_dict()) == T5Config.xxl()
    with torch.device("meta"):
        ours = T5Encoder(T5Config.xxl())
        ref = transformers.T5EncoderModel(transformers.T5Config(**_xxl_config_dict()))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert ref.encoder.embed_tokens.weight is ref.shared.weight  # the extra key is the tied alias
    assert ours_shapes == ref_shapes
    assert all(p.is_meta for p in ours.parameters())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert abs(n - 4.762e9) < 0.005e9, n


def _reach(sd, cfg, near: int, far: int) -> float:
    """How much token 10's output moves when the token `near` places on is changed, over when the token `far`
    places on is changed (mean over a few substitutions)."""
    from minidit.weights.tiny_text import TINY_T5
    enc = T5Encoder(cfg)
    enc.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, 32), generator=g)
    base = enc(ids)[0, 10]
    moved = {}
    for off in (near, far):
        d = []
        for _ in range(8):
            other = ids.clone()
            other[0, 10 + off] = torch.randint(3, cfg.vocab_size, (1,), generator=g)
            d.append(float((enc(other)[0, 10] - base).norm()))
        moved[off] = sum(d) / len(d)
    return moved[near] / moved[far]


@torch.no_grad()
def test_local_position_bias_makes_each_token_carry_its_neighbours():
    """The designed bias of the built-in T5 (tiny_text.local_position_bias): each head puts `strength` on one
    offset's bucket, and a token's output then depends far more on its neighbour than on a token 12 places on
    (measured: 16.9x) than with the random N(0, 1) bias it replaces (4.5x: some buckets near 0 happen to be
    positive), the failing variant."""
    from minidit.weights.tiny_text import LOCAL_OFFSETS, TINY_T5, _random_t5, local_position_bias
    bias = local_position_bias(TINY_T5)
    assert bias.shape == (TINY_T5.num_buckets, TINY_T5.num_heads)
    for h, off in enumerate(LOCAL_OFFSETS):
        b = int(relative_position_bucket(torch.tensor(off), TINY_T5.num_buckets, TINY_T5.max_distance))
        assert bias[b, h] == 8.0 and bias[:, h].sum() == 8.0
    sd = _random_t5(TINY_T5, seed=0)
    random_reach = _reach(sd, TINY_T5, 1, 12)
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = bias
    local_reach = _reach(sd, TINY_T5, 1, 12)
    assert local_reach > 2 * random_reach, (local_reach, random_reach)
