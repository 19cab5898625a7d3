"""FLUX transformer: parity with diffusers' FluxTransformer2DModel, full-size structure on meta, the loader."""
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from minidit.loading import CheckpointError
from minidit.flux_loading import load_transformer
from minidit.transformer import Flux, FluxConfig
from minidit.weights.tiny_flux import TINY, random_state_dict, write_tiny_flux


def grid_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


def inputs(cfg, B, h, w, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(B, h * w, cfg.in_channels, generator=g),
                txt=torch.randn(B, T, cfg.context_in_dim, generator=g),
                y=torch.randn(B, cfg.vec_in_dim, generator=g),
                t=torch.rand(B, generator=g), guidance=torch.tensor([3.5, 1.5, 5.0][:B]),
                img_ids=grid_ids(h, w), txt_ids=torch.zeros(T, 3))


def run_minidit(model, x, B):
    return model(x["img"], x["img_ids"].expand(B, -1, -1), x["txt"], x["txt_ids"].expand(B, -1, -1), x["t"], x["y"],
                 x["guidance"] if model.cfg.guidance_embed else None)


def run_diffusers(model, x, guidance):
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                 img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"] if guidance else None,
                 return_dict=False)[0]


CONFIGS = [
    # (heads, head_dim, axes, double, single, guidance)
    (3, 16, (4, 6, 6), 1, 1, True),      # odd head count
    (4, 16, (2, 8, 6), 2, 3, False),     # schnell-style, uneven RoPE split
    (5, 8, (2, 2, 4), 3, 2, True),
]


@pytest.mark.parametrize("heads,hd,axes,depth,single,guidance", CONFIGS)
@pytest.mark.parametrize("h,w,T", [(6, 4, 7), (3, 5, 13)])
def test_parity_with_diffusers(tmp_path, heads, hd, axes, depth, single, guidance, h, w, T):
    cfg = FluxConfig(hidden_size=heads * hd, num_heads=heads, axes_dim=axes, depth=depth, depth_single_blocks=single,
                     context_in_dim=24, vec_in_dim=20, guidance_embed=guidance)
    write_tiny_flux(tmp_path / "flux1.safetensors", cfg, seed=1)
    write_tiny_flux(tmp_path / "transformer", cfg, seed=1, layout="diffusers")
    ours = load_transformer(tmp_path / "flux1.safetensors")
    oracle = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    B = 2
    x = inputs(cfg, B, h, w, T)
    with torch.no_grad():
        a, b = run_minidit(ours, x, B), run_diffusers(oracle, x, guidance)
    assert a.shape == (B, h * w, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert b.abs().mean() > 0.1  # a real signal, not zeros


def test_loads_folder_written_by_diffusers(tmp_path):
    """diffusers initialises and saves its own model; minidit reads that folder (keys converted on load)."""
    torch.manual_seed(3)
    oracle = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                    pooled_projection_dim=20, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every tensor clearly non-trivial
        for p in oracle.parameters():
            p.add_(0.05 * torch.randn_like(p))
    oracle.save_pretrained(tmp_path / "transformer", max_shard_size="100KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1  # sharded
    ours = load_transformer(tmp_path)  # repository root holding transformer/
    x = inputs(ours.cfg, 2, 4, 4, 9)
    with torch.no_grad():
        torch.testing.assert_close(run_minidit(ours, x, 2), run_diffusers(oracle, x, True), atol=1e-5, rtol=1e-5)


def test_bfl_and_diffusers_layouts_identical(tmp_path):
    write_tiny_flux(tmp_path / "flux1-dev.safetensors", TINY)
    write_tiny_flux(tmp_path / "diffusers" / "transformer", TINY, layout="diffusers")
    a = load_transformer(tmp_path)  # repo root with flux1-dev.safetensors
    b = load_transformer(tmp_path / "diffusers")
    x = inputs(TINY, 2, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(run_minidit(a, x, 2), run_minidit(b, x, 2))


def test_config_inferred_from_shapes(tmp_path):
    cfg = FluxConfig(hidden_size=48, num_heads=3, axes_dim=(4, 6, 6), depth=3, depth_single_blocks=2,
                     context_in_dim=40, vec_in_dim=12, mlp_ratio=2.0, guidance_embed=False)
    write_tiny_flux(tmp_path / "f.safetensors", cfg)
    assert load_transformer(tmp_path / "f.safetensors").cfg == cfg
    shapes = {k: tuple(v.shape) for k, v in random_state_dict(cfg).items()}
    with pytest.raises(ValueError, match="axes_dim"):
        FluxConfig.from_checkpoint(shapes)  # head_dim 16 is not FLUX's 128: RoPE split must be given


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_stored_dtypes_load_into_compute_dtype(tmp_path, stored):
    write_tiny_flux(tmp_path / "f.safetensors", TINY, dtype=stored)
    m = load_transformer(tmp_path / "f.safetensors", dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    ref = random_state_dict(TINY)
    got = m.state_dict()
    for k in ("img_in.weight", "single_blocks.1.linear1.weight"):
        assert torch.equal(got[k], ref[k].to(stored).float())  # exactly the stored values, cast up
    if stored == torch.float8_e4m3fn:
        assert not torch.equal(got["img_in.weight"], ref["img_in.weight"])  # fp8 really was fp8
    x = inputs(TINY, 1, 2, 2, 3)
    with torch.no_grad():
        assert torch.isfinite(run_minidit(m, x, 1)).all()


# ------------------------------------------------------------------------------------------- full size, meta

def _official_keys(cfg: FluxConfig) -> dict[str, tuple]:
    """The official BFL key list, derived without minidit's module: diffusers' published architecture on meta,
    mapped back through diffusers' own BFL->diffusers converter (run on meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    with torch.device("meta"):
        d = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=cfg.guidance_embed,
                                   axes_dims_rope=(16, 56, 56))
    return {k: tuple(v.shape) for k, v in d.state_dict().items()}, convert_flux_transformer_checkpoint_to_diffusers


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_structure_on_meta(name):
    cfg = FluxConfig.preset(name)
    with torch.device("meta"):
        ours = Flux(cfg)
    sd = ours.state_dict()
    assert all(t.is_meta for t in sd.values())  # nothing allocated
    diffusers_shapes, convert = _official_keys(cfg)
    converted = convert({k: v for k, v in sd.items()})  # diffusers' own mapping of our (BFL) keys
    assert {k: tuple(v.shape) for k, v in converted.items()} == diffusers_shapes
    n = sum(p.numel() for p in ours.parameters())
    if name == "flux-dev":
        assert round(n / 1e9, 1) == 11.9 and n == 11_901_408_320
        assert "guidance_in.in_layer.weight" in sd
    else:
        assert "guidance_in.in_layer.weight" not in sd
    assert sd["double_blocks.18.img_attn.qkv.weight"].shape == (9216, 3072)
    assert sd["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert sd["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)
    assert FluxConfig.from_checkpoint({k: tuple(v.shape) for k, v in sd.items()}) == cfg


# ------------------------------------------------------------------------------------------------ errors

def test_error_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_transformer(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["flux1-dev.ckpt", "model.pt", "pytorch_model.bin"])
def test_error_pickled_refused(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"\x80\x04\x95 definitely a pickle")
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        load_transformer(p)


def test_error_pickled_only_folder(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="refused"):
        load_transformer(tmp_path)


def test_error_truncated(tmp_path):
    p = write_tiny_flux(tmp_path / "f.safetensors", TINY)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_transformer(p)


def test_error_missing_unexpected_and_shape(tmp_path):
    sd = random_state_dict(TINY)
    del sd["double_blocks.1.txt_mlp.2.bias"]
    sd["double_blocks.0.extra.weight"] = torch.zeros(2)
    sd["single_blocks.0.linear2.weight"] = torch.zeros(64, 100)
    save_file(sd, str(tmp_path / "f.safetensors"), metadata={"axes_dim": "4,6,6"})
    with pytest.raises(CheckpointError) as e:
        load_transformer(tmp_path / "f.safetensors")
    msg = str(e.value)
    assert "missing keys (1): double_blocks.1.txt_mlp.2.bias" in msg
    assert "unexpected keys (1): double_blocks.0.extra.weight" in msg
    assert "single_blocks.0.linear2.weight: checkpoint (64, 100) vs model (64, 320)" in msg


def test_error_diffusers_missing_shard(tmp_path):
    write_tiny_flux(tmp_path / "transformer", TINY, layout="diffusers")
    (tmp_path / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: diffusion_pytorch_model-00002-of-00002"):
        load_transformer(tmp_path)


def test_error_diffusers_missing_key_named_in_its_layout(tmp_path):
    write_tiny_flux(tmp_path / "transformer", TINY, layout="diffusers")
    idx = json.loads((tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["transformer_blocks.1.attn.to_k.weight"]
    from safetensors.torch import load_file
    f = tmp_path / "transformer" / shard
    sd = load_file(str(f))
    del sd["transformer_blocks.1.attn.to_k.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="transformer_blocks.1.attn.to_k.weight"):
        load_transformer(tmp_path)


def test_guidance_required_for_dev():
    torch.manual_seed(0)
    m = Flux(TINY)
    x = inputs(TINY, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="guidance"):
        m(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"], None)


def test_comfyui_prefixed_single_file(tmp_path):
    """Files saved by ComfyUI keep the BFL keys under `model.diffusion_model.`; they load the same."""
    sd = random_state_dict(TINY, seed=5)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(tmp_path / "comfy.safetensors"),
              metadata={"axes_dim": "4,6,6"})
    write_tiny_flux(tmp_path / "plain.safetensors", TINY, seed=5)
    a, b = load_transformer(tmp_path / "comfy.safetensors"), load_transformer(tmp_path / "plain.safetensors")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in b.state_dict())


def test_fp16_streams_are_clipped_like_diffusers(tmp_path):
    """In fp16 the text stream (double blocks) and the single blocks' output are clipped to ±65504, as diffusers
    does, instead of overflowing to inf. Forced: residual 6e4 plus a gated MLP output of 1e4."""
    from minidit.rope import embed_nd
    write_tiny_flux(tmp_path / "t.safetensors", TINY)
    m = load_transformer(tmp_path / "t.safetensors", dtype=torch.float16)
    h = TINY.hidden_size
    with torch.no_grad():
        for mod, gate in ((m.double_blocks[0].txt_mod, 5), (m.single_blocks[0].modulation, 2)):
            mod.lin.weight.zero_()
            mod.lin.bias.zero_()
            mod.lin.bias[gate * h:(gate + 1) * h] = 1.0   # the MLP gate (double: gate2; single: its only gate)
        m.double_blocks[0].txt_mlp[2].bias.fill_(1e4)
        m.single_blocks[0].linear2.bias.fill_(1e4)
    T, N = 3, 4
    img = torch.randn(1, N, h, dtype=torch.float16)
    txt = torch.full((1, T, h), 6e4, dtype=torch.float16)
    vec = torch.randn(1, h, dtype=torch.float16)
    pe = embed_nd(torch.cat([torch.zeros(1, T, 3), grid_ids(2, 2)[None]], 1), TINY.axes_dim, TINY.theta)
    with torch.no_grad():
        _, t_out = m.double_blocks[0](img, txt, vec, pe)
        x_out = m.single_blocks[0](torch.cat([txt, img], 1), vec, pe, T)
    assert torch.isfinite(t_out).all() and (t_out == 65504).any()
    assert torch.isfinite(x_out).all() and (x_out[:, :T] == 65504).any()
    with torch.no_grad():  # the same in fp32 is not clipped
        _, t32 = m.float().double_blocks[0](img.float(), txt.float(), vec.float(), pe)
    assert t32.max() > 65504


def test_file_reads_are_owned_and_equal_the_mapped_tensors(tmp_path):
    """LazyStateDict.read: plain file reads into owned memory, bit-equal to the memory-mapped tensor."""
    from minidit.loading import LazyStateDict
    path = write_tiny_flux(tmp_path / "flux1.safetensors", TINY, dtype=torch.bfloat16)
    sd = LazyStateDict([path])
    for k in sd:
        mapped, read = sd[k], sd.read(k)
        assert read.dtype == mapped.dtype and torch.equal(read, mapped), k
        assert read.untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
    with pytest.raises(CheckpointError, match="does not fit"):
        sd.read("img_in.weight", torch.empty(3, dtype=torch.bfloat16))


def test_diffusers_fusion_reads_each_source_into_its_rows(tmp_path):
    """The fused q/k/v (+ MLP-in) tensors built by Converted.read equal torch.cat of the sources, mixed stored
    dtypes included (cast into place), and the loaded model equals the BFL file's."""
    from minidit.loading import Converted, LazyStateDict
    from minidit.transformer import diffusers_to_bfl_plan
    folder = write_tiny_flux(tmp_path / "transformer", TINY, layout="diffusers")
    files = sorted(folder.glob("*.safetensors"))
    sd = Converted(LazyStateDict(files), diffusers_to_bfl_plan(TINY.depth, TINY.depth_single_blocks, True))
    for k, (op, srcs) in sd.plan.items():
        assert torch.equal(sd.read(k), sd[k]), k
    key = "single_blocks.0.linear1.weight"
    srcs = sd.plan[key][1]
    mixed = {s: sd.src[s].to(torch.bfloat16 if i == 1 else torch.float32) for i, s in enumerate(srcs)}
    save_file(mixed, tmp_path / "mixed.safetensors")
    one = Converted(LazyStateDict([tmp_path / "mixed.safetensors"]), {key: ("cat", srcs)})
    assert one.read(key).dtype == torch.float32
    torch.testing.assert_close(one.read(key), torch.cat([mixed[s].float() for s in srcs]), atol=0, rtol=0)
    write_tiny_flux(tmp_path / "flux1.safetensors", TINY)
    a, b = load_transformer(tmp_path / "flux1.safetensors"), load_transformer(folder)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka

