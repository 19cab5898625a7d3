"""TextEncoder: equal to diffusers' FluxPipeline.encode_prompt on a tiny FLUX folder; loading errors."""
import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidit.loading import CheckpointError
from minidit.text_encoder import TextEncoder, load_clip, load_t5
from minidit.weights.tiny_text import CORPUS, write_clip_tokenizer, write_t5_tokenizer, write_tiny_clip, write_tiny_t5

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a photo of a cat wearing a red hat, 4k", "", "Zürich at NIGHT 😀, café  au\tlait!",
           " ".join(CORPUS[:12])]  # the last one is longer than 77 CLIP tokens


def _write_root(root):
    write_tiny_t5(root / "text_encoder_2")
    write_tiny_clip(root / "text_encoder")
    write_t5_tokenizer(root / "tokenizer_2")
    write_clip_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return _write_root(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def pipe(root):
    """diffusers' FluxPipeline with only the text parts, each read from the tiny folder by transformers."""
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, transformer=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2").eval(),
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2"))


@pytest.mark.parametrize("max_length", [512, 256])
def test_encode_matches_flux_pipeline(root, pipe, max_length):
    te = TextEncoder.load(root, dtype=torch.float32, max_length=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt is truncated by CLIP
        txt, vec = te.encode(PROMPTS)
    with torch.no_grad():
        ref_txt, ref_vec, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=max_length)
    assert txt.shape == ref_txt.shape == (4, max_length, 32) and vec.shape == ref_vec.shape == (4, 32)
    assert txt.dtype == ref_txt.dtype and vec.dtype == ref_vec.dtype
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec, ref_vec, atol=1e-5, rtol=1e-5)


def test_encode_matches_flux_pipeline_fp64(root, pipe):
    """In float64 the agreement is to rounding (same ids, same math)."""
    te = TextEncoder.load(root, dtype=torch.float64)
    pipe.text_encoder.double()
    pipe.text_encoder_2.double()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            txt, vec = te.encode(PROMPTS)
        with torch.no_grad():
            ref_txt, ref_vec, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    finally:
        pipe.text_encoder.float()
        pipe.text_encoder_2.float()
    torch.testing.assert_close(txt, ref_txt, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(vec, ref_vec, atol=1e-10, rtol=1e-10)


def test_prompt_2_and_single_string(root, pipe):
    te = TextEncoder.load(root, dtype=torch.float32, max_length=64)
    txt, vec = te.encode("a cat", prompts_2="a dog")
    with torch.no_grad():
        ref_txt, ref_vec, _ = pipe.encode_prompt("a cat", prompt_2="a dog", device="cpu", max_sequence_length=64)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec, ref_vec, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 prompts for CLIP but 1 for T5"):
        te.encode(["a", "b"], prompts_2=["c"])


def test_defaults_and_devices(root, tmp_path):
    assert TextEncoder.load(root).t5.shared.weight.dtype == torch.float32  # the loaders' rule: fp32 on the CPU
    te = TextEncoder.load(root, dtype=torch.bfloat16)
    assert te.max_length == 512 and te.t5.shared.weight.dtype == torch.bfloat16
    txt, vec = te.encode("a cat", device="meta")  # results go where the transformer lives
    assert txt.is_meta and vec.is_meta and txt.shape == (1, 512, 32) and txt.dtype == torch.bfloat16
    assert te.to("cpu", torch.float32) is te and te.encode("a cat")[0].dtype == torch.float32
    with pytest.raises(ValueError, match="float16"):
        te.to(dtype=torch.float16)
    schnell = tmp_path / "schnell"
    shutil.copytree(root, schnell)
    (schnell / "transformer").mkdir()
    (schnell / "transformer" / "config.json").write_text(json.dumps({"guidance_embeds": False}))
    assert TextEncoder.load(schnell).max_length == 256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_close_to_cpu_fp32(root):
    ref_txt, ref_vec = TextEncoder.load(root, dtype=torch.float32).encode(PROMPTS[:3])
    txt, vec = TextEncoder.load(root, device="cuda", dtype=torch.bfloat16).encode(PROMPTS[:3], device="cpu")
    assert txt.device.type == "cpu" and txt.dtype == torch.bfloat16
    assert (txt.float() - ref_txt).abs().max() < 0.05 * ref_txt.abs().max()
    assert (vec.float() - ref_vec).abs().max() < 0.05 * ref_vec.abs().max()


# ---------------------------------------------------------------- errors


def test_missing_folders(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="not found"):
        TextEncoder.load(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(root, partial, ignore=shutil.ignore_patterns("tokenizer_2"))
    with pytest.raises(FileNotFoundError, match="tokenizer_2/"):
        TextEncoder.load(partial)
    te = TextEncoder.load(partial, t5_tokenizer=root / "tokenizer_2")  # an explicit path fills the gap
    assert te.t5_tokenizer.vocab_size == 500
    with pytest.raises(FileNotFoundError, match="no root folder"):
        TextEncoder.load(None, clip=root / "text_encoder")
    with pytest.raises(CheckpointError, match="not found"):
        load_t5(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_clip(tmp_path / "empty")


def test_missing_shard(tmp_path):
    folder = write_tiny_t5(tmp_path / "t5", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_t5(folder)


def test_missing_and_unexpected_keys_named(tmp_path):
    folder = write_tiny_t5(tmp_path / "t5", shards=1)
    file = folder / "model-00001-of-00001.safetensors"
    sd = load_file(file)
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    sd["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    save_file(sd, file)
    with pytest.raises(CheckpointError) as e:
        load_t5(folder)
    msg = str(e.value)
    assert "missing keys (1): encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in msg
    assert "unexpected keys (1): encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in msg

    clip = write_tiny_clip(tmp_path / "clip")
    sd = load_file(clip / "model.safetensors")
    sd["text_model.final_layer_norm.bias"] = torch.zeros(7)
    save_file(sd, clip / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"text_model.final_layer_norm.bias: checkpoint \(7,\) vs model \(32,\)"):
        load_clip(clip)


def test_pickle_refused(tmp_path):
    folder = write_tiny_clip(tmp_path / "clip")
    sd = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_clip(folder)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_clip(folder / "pytorch_model.bin", config=folder / "config.json")


def test_bad_config(tmp_path):
    folder = write_tiny_t5(tmp_path / "t5")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj='relu'"):
        load_t5(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_t5(folder)
