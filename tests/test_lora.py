"""LoRA merging (minidit.lora): each layout against diffusers' load_lora_weights + fuse_lora on tiny checkpoints,
diffusers' converters at full FLUX.1 size (they hard-code its widths and block counts), BFL's control LoRAs
against BFL's own definition, switching, and one-line errors before the model loads."""
import json

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import save_file
from test_transformer import inputs, run_diffusers, run_minidit

from minidit import loading
from minidit.loading import CheckpointError, Converted
from minidit.flux_loading import load_transformer, set_loras
from minidit.lora import lora_info, parse_lora_arg, part_rows, read_lora, swap_halves
from minidit.transformer import FluxConfig, diffusers_to_bfl_plan
from minidit.weights.tiny_flux import TINY, write_tiny_flux
from minidit.weights.tiny_lora import tiny_lora, write_tiny_lora

SCALE = 0.7


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    write_tiny_flux(root / "transformer", TINY, layout="diffusers")
    return write_tiny_flux(root / "flux1-dev.safetensors", TINY), root / "transformer"


def diffusers_fused(folder, files, scale):
    """diffusers' FluxTransformer2DModel with the LoRA files loaded and fused, and its weights in BFL names."""
    model = FluxTransformer2DModel.from_pretrained(folder).eval()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"a{i}")
    pipe.set_adapters([f"a{i}" for i in range(len(files))], [1.0] * len(files))  # all active, then fused
    pipe.fuse_lora(lora_scale=scale)
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    bfl = Converted(sd, diffusers_to_bfl_plan(TINY.depth, TINY.depth_single_blocks, True))
    return model, {k: bfl[k] for k in bfl}


KOHYA_SKIP = ("linear1", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def wide_img_in():
    """A diffusers-layout LoRA whose x_embedder lora_A is 128 wide: both widen dev's img_in with zeros."""
    sd = tiny_lora(TINY, "diffusers", only=("x_embedder", "attn.to_q"))
    sd["transformer.x_embedder.lora_A.weight"] = torch.randn(4, 128) / 8
    return sd


LAYOUTS = {
    "diffusers": lambda: [tiny_lora(TINY, "diffusers")],
    "diffusers-alpha": lambda: [tiny_lora(TINY, "diffusers", alpha=2.0)],
    "diffusers-some": lambda: [tiny_lora(TINY, "diffusers", only=("attn.to_k", "proj_mlp", "norm_out", "x_embedder"))],
    "diffusers-wide": lambda: [wide_img_in()],
    # diffusers' kohya converter splits single-block linear1 at FLUX.1's widths (3072 x 3 + 12288), and names the
    # embedders and final layer without `transformer.`, so load_lora_weights drops them: both tested at full size
    "kohya": lambda: [tiny_lora(TINY, "kohya", alpha=2.0, skip=KOHYA_SKIP)],
    "xlabs": lambda: [tiny_lora(TINY, "xlabs")],
    "two": lambda: [tiny_lora(TINY, "diffusers", seed=1), tiny_lora(TINY, "kohya", alpha=8.0, seed=2, skip=KOHYA_SKIP)],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_merged_weights_and_forward_match_diffusers(tmp_path, base, name):
    bfl_file, folder = base
    sds = LAYOUTS[name]()
    files = [tmp_path / f"l{i}.safetensors" for i in range(len(sds))]
    for f, sd in zip(files, sds):
        save_file(sd, str(f))
    ours = load_transformer(bfl_file, "cpu", torch.float32, loras=[(f, SCALE) for f in files])
    plain = load_transformer(bfl_file, "cpu", torch.float32)
    oracle, theirs = diffusers_fused(folder, files, SCALE)
    mine, before = ours.state_dict(), plain.state_dict()
    assert mine.keys() == theirs.keys()
    changed = 0
    for k, v in mine.items():
        torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-6, msg=k)
        changed += v.shape != before[k].shape or not torch.equal(v, before[k])
    assert changed >= 4  # the LoRA really changed the weights
    assert ours.cfg.in_channels == (128 if name == "diffusers-wide" else 64)
    x = inputs(ours.cfg, 2, 4, 3, 5)
    with torch.no_grad():
        a, b = run_minidit(ours, x, 2), run_diffusers(oracle, x, True)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if name != "diffusers-wide":
            assert (a - run_minidit(plain, x, 2)).abs().mean() > 1e-2


def test_peft_metadata_alpha(tmp_path, base):
    """diffusers' save_lora_weights records PEFT's r / lora_alpha / alpha_pattern in `lora_adapter_metadata`."""
    bfl_file, folder = base
    sd = tiny_lora(TINY, "diffusers", rank=4)
    modules = sorted({k[len("transformer."):].split(".lora_")[0] for k in sd})
    meta = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"proj_out": 2}, target_modules=modules).to_dict()
    meta = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in meta.items()}  # as
    # FluxPipeline.save_lora_weights writes it
    path = tmp_path / "p.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    ours = load_transformer(bfl_file, "cpu", torch.float32, loras=[(path, 0.5)])
    plain = load_transformer(bfl_file, "cpu", torch.float32).state_dict()
    _, theirs = diffusers_fused(folder, [path], 0.5)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-6, msg=k)
    # alpha 8 / r 4 on every module but proj_out (2 / 4): the deltas differ by 4x between the two kinds
    d1 = ours.state_dict()["img_in.weight"] - plain["img_in.weight"]
    with_meta = read_lora(path)
    assert {d.alpha_scale for d in with_meta.deltas} == {2.0, 0.5} and d1.abs().max() > 0


# --------------------------------------------------------------------------------- full size: the converters

FULL = FluxConfig.preset("flux-dev")


def probe_deltas_ours(lora, cfg, x):
    """{BFL module: (Δ·x, Δbias)} from minidit's parse of the file (rows, swap, α/r), Δ·x without forming Δ."""
    out = {}
    for d in lora.deltas:
        w = FULL_SHAPES[d.target.module + ".weight"]
        lo, hi = part_rows(cfg, d.target, w[0])
        up, down = lora.sd.read(d.up).double(), lora.sd.read(d.down).double()
        y = (swap_halves(up) if d.target.swap else up) @ (down @ x[:down.shape[1]]) * d.alpha_scale
        acc = out.setdefault(d.target.module, [torch.zeros(w[0], x.shape[1], dtype=x.dtype), torch.zeros(w[0])])
        acc[0][lo:hi] += y
        if d.bias is not None:
            b = lora.sd.read(d.bias).float()
            acc[1][lo:hi] += swap_halves(b) if d.target.swap else b
    return out


def probe_deltas_diffusers(converted, x):
    """The same from diffusers' converted state dict (diffusers names), placed into BFL rows by the base plan."""
    out = {}
    converted = {k.removeprefix("transformer."): v for k, v in converted.items()}
    for bfl, (op, srcs) in diffusers_to_bfl_plan(19, 38, True).items():
        if not bfl.endswith(".weight") or f"{srcs[0][:-7]}.lora_A.weight" not in converted:
            continue
        ys, bs = [], []
        for s in srcs:
            m = s[:-len(".weight")]
            a, b = converted[f"{m}.lora_A.weight"].double(), converted[f"{m}.lora_B.weight"].double()
            ys.append(b @ (a @ x[:a.shape[1]]))
            bs.append(converted.get(f"{m}.lora_B.bias", torch.zeros(b.shape[0])).float())
        y, bias = torch.cat(ys), torch.cat(bs)
        out[bfl[:-7]] = [swap_halves(y), swap_halves(bias)] if op == "swap" else [y, bias]
    return out


with torch.device("meta"):
    from minidit.transformer import Flux
    FULL_SHAPES = {k: tuple(v.shape) for k, v in Flux(FluxConfig.preset("flux-control")).state_dict().items()}


@pytest.mark.parametrize("layout", ["kohya", "bfl-control"])
def test_full_size_conversion_matches_diffusers_converter(tmp_path, layout):
    """Rank-2 LoRAs on every Linear of full-size FLUX.1-dev, through diffusers' own converter
    (FluxPipeline.lora_state_dict) and minidit's parse, compared as Δ·x on random probes (no 12B tensors).
    kohya: diffusers' converter gives the embedders and final layer no `transformer.` prefix (its loader then
    drops them, so a kohya LoRA's img_in/txt_in/time_in/vector_in/guidance_in/final_layer is ignored by diffusers);
    their math is compared here and minidit merges them, as sd-scripts trains and ComfyUI applies them.
    BFL control: the one difference is diffusers' final_layer.adaLN_modulation.1, whose lora_A rows it swaps;
    minidit's delta there is BFL's definition (lora_B(lora_A(x)) on the file's own tensors)."""
    sd = tiny_lora(FULL, layout, rank=2, alpha=3.0, seed=4)
    path = tmp_path / "full.safetensors"
    save_file(sd, str(path))
    lora = read_lora(path, 1.0, FULL, check_values=False)
    x = torch.randn(15360, 3, dtype=torch.float64)
    ours = probe_deltas_ours(lora, FULL, x)
    theirs = probe_deltas_diffusers(FluxPipeline.lora_state_dict(dict(sd)), x)
    assert len(ours) == len(theirs) == len([k for k in FULL_SHAPES if k.endswith(".weight")
                                            and len(FULL_SHAPES[k]) == 2])
    final = "final_layer.adaLN_modulation.1"
    for m in ours:
        if layout == "bfl-control" and m == final:
            assert not torch.allclose(ours[m][0], theirs[m][0], atol=1e-3)  # diffusers' lora_A swap
            bfl = sd[f"{m}.lora_B.weight"].double() @ (sd[f"{m}.lora_A.weight"].double() @ x[:3072])
            torch.testing.assert_close(ours[m][0], bfl, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours[m][1], sd[f"{m}.lora_B.bias"], atol=0, rtol=0)
            continue
        if layout == "kohya" and m.startswith("final_layer"):  # diffusers' converter leaves out α/r there
            theirs[m][0] *= 3.0 / 2                               # (assign_remaining_weights); sd-scripts does not
        torch.testing.assert_close(ours[m][0], theirs[m][0], atol=1e-5, rtol=1e-5, msg=m)
        torch.testing.assert_close(ours[m][1], theirs[m][1], atol=1e-6, rtol=1e-6, msg=m)
    if layout == "bfl-control":
        assert len(lora.replace) == 4 * 19 + 2 * 38 and lora.in_channels == 128


# --------------------------------------------------------------------------------- BFL control LoRAs (tiny)

def bfl_definition(base_sd, lora_sd, scale):
    """BFL's src/flux/util.py load_flow_model for flux-dev-depth-lora, merged: dev's tensors zero-expanded to the
    128-wide img_in (optionally_expand_state_dict), every LinearLora base(x) + scale·lora_B(lora_A(x)) (lora_B has
    a bias), the file's norm scales assigned over the base's."""
    out = {k: v.clone() for k, v in base_sd.items()}
    w = lora_sd["img_in.lora_A.weight"].shape[1]
    out["img_in.weight"] = torch.cat([out["img_in.weight"], torch.zeros(out["img_in.weight"].shape[0], w - 64)], 1)
    for k, v in lora_sd.items():
        if k.endswith(".lora_A.weight"):
            m = k[:-len(".lora_A.weight")]
            out[f"{m}.weight"] += scale * lora_sd[f"{m}.lora_B.weight"] @ v
            out[f"{m}.bias"] += scale * lora_sd[f"{m}.lora_B.bias"]
        elif k.endswith(".scale"):
            out[k] = v.clone()
    return out


def test_dev_plus_control_lora_is_bfl_control_model(tmp_path, base):
    from minidit.weights.tiny_flux import random_state_dict
    bfl_file, _ = base
    lora = write_tiny_lora(tmp_path / "flux1-depth-dev-lora.safetensors", TINY, "bfl-control", rank=3)
    m = load_transformer(bfl_file, "cpu", torch.float32, loras=[(lora, SCALE)])
    assert m.cfg.in_channels == 128 and m.cfg.variant == "control"
    from safetensors.torch import load_file
    ref = bfl_definition(random_state_dict(TINY), load_file(lora), SCALE)
    got = m.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6, msg=k)
    assert torch.equal(got["double_blocks.1.txt_attn.norm.key_norm.scale"],
                       load_file(lora)["double_blocks.1.txt_attn.norm.key_norm.scale"])  # replaced, not scaled
    x = inputs(m.cfg, 1, 2, 2, 3)
    with torch.no_grad():
        assert torch.isfinite(run_minidit(m, x, 1)).all()


# --------------------------------------------------------------------------------- switching, dtypes, info

def test_set_loras_is_a_fresh_load(tmp_path, base):
    bfl_file, _ = base
    a = write_tiny_lora(tmp_path / "a.safetensors", TINY, "kohya", alpha=2.0, seed=1)
    c = write_tiny_lora(tmp_path / "c.safetensors", TINY, "bfl-control", seed=2)
    m = load_transformer(bfl_file, "cpu", torch.bfloat16, loras=[(a, 1.0)])
    for loras in ([(c, 0.5), (a, 0.3)], [], [(a, 2.0)]):
        set_loras(m, loras)
        fresh = load_transformer(bfl_file, "cpu", torch.bfloat16, loras=loras)
        assert m.cfg == fresh.cfg
        for (k, v), (k2, v2) in zip(m.state_dict().items(), fresh.state_dict().items()):
            assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2), k
    assert [x[2] for x in lora_info(m.loras)] == [2.0]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float8_e4m3fn])
def test_merge_in_fp32_then_cast(tmp_path, stored):
    """W (stored dtype, dequantized) + s·B·A formed in fp32, cast once to the compute dtype."""
    path = write_tiny_flux(tmp_path / "f.safetensors", TINY, dtype=stored)
    lora = write_tiny_lora(tmp_path / "l.safetensors", TINY, "diffusers", dtype=torch.bfloat16)
    fp32 = load_transformer(path, "cpu", torch.float32, loras=[(lora, SCALE)]).state_dict()
    bf16 = load_transformer(path, "cpu", torch.bfloat16, loras=[(lora, SCALE)]).state_dict()
    base = load_transformer(path, "cpu", torch.float32).state_dict()
    for k in fp32:
        assert torch.equal(bf16[k], fp32[k].to(torch.bfloat16)), k
    assert not torch.equal(fp32["single_blocks.0.linear1.weight"], base["single_blocks.0.linear1.weight"])


def test_info_and_arguments(tmp_path):
    p = write_tiny_lora(tmp_path / "style.safetensors", TINY, "kohya", alpha=2.0)
    info = lora_info([read_lora(p, 0.8)])
    assert info[0][0] == "style.safetensors" and len(info[0][1]) == 16 and info[0][2] == 0.8
    assert read_lora(p).fingerprint == info[0][1]
    # the header's names, shapes, dtypes, offsets and metadata, not the values: equal headers, equal fingerprints
    q = write_tiny_lora(tmp_path / "style2.safetensors", TINY, "kohya", alpha=3.0, seed=5)
    assert read_lora(q).fingerprint == info[0][1]
    r = write_tiny_lora(tmp_path / "style3.safetensors", TINY, "kohya", alpha=2.0, metadata={"ss_output_name": "x"})
    assert read_lora(r).fingerprint != info[0][1]
    assert read_lora(write_tiny_lora(tmp_path / "s4.safetensors", TINY, "kohya", rank=2)).fingerprint != info[0][1]
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    assert parse_lora_arg("b.safetensors:-1e-1") == ("b.safetensors", -0.1)
    with pytest.raises(ValueError, match="finite"):
        parse_lora_arg("b.safetensors:nan")


# --------------------------------------------------------------------------------- errors before loading

def bad(tmp_path, name, sd, meta=None):
    p = tmp_path / name
    save_file(sd, str(p), metadata=meta)
    return p


ERRORS = {
    "unknown": (lambda: tiny_lora(TINY, "diffusers") | {"transformer.pos_embed.lora_A.weight": torch.zeros(2, 4)},
                r"1 keys are not FLUX.1 transformer LoRA weights .*: transformer.pos_embed.lora_A.weight"),
    "lokr": (lambda: {"lora_unet_single_blocks_0_linear1.lokr_w1": torch.zeros(2, 2)},
             "lora_unet_single_blocks_0_linear1.lokr_w1"),
    "text encoder": (lambda: tiny_lora(TINY, "kohya") | {"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha":
                                                          torch.tensor(1.0)}, "text-encoder LoRA"),
    "nan": (lambda: {k: v.fill_(float("nan")) if "img_mod" in k else v for k, v in tiny_lora(TINY, "bfl").items()},
            "holds NaN or Inf"),
    "shape": (lambda: tiny_lora(FluxConfig(hidden_size=48, num_heads=3, depth=2, depth_single_blocks=2,
                                           axes_dim=(4, 6, 6), context_in_dim=32, vec_in_dim=32), "kohya"),
              "shapes for another model"),
    "depth": (lambda: tiny_lora(TINY, "diffusers") | {
        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 64),
        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
        "for another model: this FLUX model has no double_blocks.7.img_attn.qkv"),
    "huge index": (lambda: {"transformer.transformer_blocks.999999999.attn.to_q.lora_A.weight": torch.zeros(4, 64),
                            "transformer.transformer_blocks.999999999.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
                   "2 keys are not FLUX.1 transformer LoRA weights"),
    "rank": (lambda: tiny_lora(TINY, "kohya") | {"lora_unet_img_in.lora_down.weight": torch.zeros(3, 64)},
             "rank mismatch in lora_unet_img_in"),
    "unpaired": (lambda: {"lora_unet_img_in.lora_down.weight": torch.zeros(3, 64)}, "not both factors"),
    "alpha only": (lambda: {"double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0)}, "not both factors"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_lora_is_one_named_line_before_the_model_loads(tmp_path, base, monkeypatch, case):
    make, pattern = ERRORS[case]
    p = bad(tmp_path, f"{case.replace(' ', '_')}.safetensors", make())
    monkeypatch.setattr(loading, "load_streaming", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(CheckpointError, match=pattern) as e:
        load_transformer(base[0], "cpu", loras=[(p, 1.0)])
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_not_safetensors_and_missing(tmp_path, base):
    (tmp_path / "l.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="l.ckpt: pickled checkpoints are refused"):
        read_lora(tmp_path / "l.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a header")
    with pytest.raises(CheckpointError, match="junk.safetensors: corrupt or truncated"):
        load_transformer(base[0], "cpu", loras=[(tmp_path / "junk.safetensors", 1.0)])
    with pytest.raises(CheckpointError, match="not found"):
        read_lora(tmp_path / "nope.safetensors")
    p = write_tiny_lora(tmp_path / "ok.safetensors", TINY, "bfl")
    with pytest.raises(CheckpointError, match="scale inf must be a finite number"):
        read_lora(p, float("inf"))


def test_two_control_loras_conflict(tmp_path, base):
    a = write_tiny_lora(tmp_path / "a.safetensors", TINY, "bfl-control", seed=1)
    b = write_tiny_lora(tmp_path / "b.safetensors", TINY, "bfl-control", seed=2)
    with pytest.raises(CheckpointError, match="b.safetensors: replaces .*norm.*which .*a.safetensors replaces too"):
        load_transformer(base[0], "cpu", loras=[(a, 1.0), (b, 1.0)])


def test_comfyui_key_names_merge_like_kohya(tmp_path, base):
    """ComfyUI saves kohya-style factors under BFL module names (`diffusion_model.double_blocks.0.img_attn.qkv.
    lora_down.weight`): the same LoRA in both namings merges to the same weights."""
    from minidit.lora import key_table
    sd = tiny_lora(TINY, "kohya", alpha=2.0)
    kohya_to_bfl = {k: t.module for k, t in key_table(2, 2)[0].items() if k.startswith("lora_unet_")}
    comfy = {}
    for k, v in sd.items():
        module, _, part = k.partition(".")
        comfy[f"diffusion_model.{kohya_to_bfl[module]}.{part}"] = v
    a, b = bad(tmp_path, "kohya.safetensors", sd), bad(tmp_path, "comfy.safetensors", comfy)
    ma = load_transformer(base[0], "cpu", torch.float32, loras=[(a, SCALE)]).state_dict()
    mb = load_transformer(base[0], "cpu", torch.float32, loras=[(b, SCALE)]).state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_merge_streams_with_plain_file_reads(tmp_path, base, monkeypatch):
    """The merged load reads the base as the plain load does (owned file reads, never the memory map), and a
    checked Lora passed back in is not read again for its values."""
    from minidit.loading import LazyStateDict
    from minidit.lora import read_loras
    lora = read_loras([(write_tiny_lora(tmp_path / "l.safetensors", TINY, "bfl-control"), 1.0)], TINY)
    assert lora[0].finite
    mapped = LazyStateDict.__getitem__

    def no_mapped_reads(self, key):  # a missing key may still be looked up (`in`): only real reads fail
        if key in set(self):
            pytest.fail(f"{key} read through the memory map")
        return mapped(self, key)
    monkeypatch.setattr(LazyStateDict, "__getitem__", no_mapped_reads)
    monkeypatch.delenv("MINIDIT_MMAP", raising=False)
    m = load_transformer(base[0], "cpu", torch.float32, loras=lora)
    assert m.cfg.variant == "control" and m.loras[0] is lora[0]
