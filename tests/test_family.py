"""The FLUX.1 family's pipelines against diffusers 0.42's FluxFillPipeline / FluxControlPipeline /
FluxKontextPipeline on tiny random checkpoints in every official layout; Kontext's several references by their
defining property; bad inputs; FreeCus on Fill and on a control model."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_lora import bfl_definition

from minidit import family, sampling
from minidit.loading import CheckpointError
from minidit.masks import Reference
from minidit.pipeline import Pipeline
from minidit.weights.tiny import MODEL_INDEX, write_tiny_repo
from minidit.weights.tiny_flux import TINY, VARIANTS, random_state_dict, save_diffusers, write_tiny_variant
from minidit.weights.tiny_lora import write_tiny_lora

LAYOUTS = ("bfl", "comfyui", "diffusers")


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """One tiny repository per family member (diffusers layout, read by both), with the same transformer also
    as a BFL file and a ComfyUI file beside it: {variant: (root, {layout: transformer path})}."""
    d = tmp_path_factory.mktemp("family")
    base = write_tiny_repo(d / "base", "dev", seed=0)
    out = {}
    for variant in ("fill", "depth", "kontext"):
        root = d / variant
        shutil.copytree(base, root, ignore=shutil.ignore_patterns("flux1-*", "transformer"))
        write_tiny_variant(root, variant, seed=4, layout="diffusers")
        (root / "model_index.json").write_text(json.dumps(dict(MODEL_INDEX, _class_name=VARIANTS[variant][3])))
        files = {layout: write_tiny_variant(d / f"{variant}-{layout}", variant, seed=4, layout=layout)
                 for layout in ("bfl", "comfyui")}
        out[variant] = root, files | {"diffusers": root}
    # dev + BFL's control LoRA; its oracle: BFL's definition merged, as a 128-wide diffusers transformer
    lora = write_tiny_lora(d / "flux1-depth-dev-lora.safetensors", TINY, "bfl-control", rank=3)
    merged = bfl_definition(random_state_dict(TINY), load_file(lora), 0.8)
    oracle = d / "dev-lora"
    shutil.copytree(base, oracle, ignore=shutil.ignore_patterns("flux1-*", "transformer"))
    save_diffusers(merged, TINY.__class__(**{**TINY.__dict__, "in_channels": 128}), oracle / "transformer")
    out["dev+lora"] = oracle, {"lora": (base, lora)}
    return out


PIPES = {}


def ours(repos, variant, layout):
    if (variant, layout) not in PIPES:
        root, files = repos[variant]
        if layout == "lora":
            base, lora = files["lora"]
            PIPES[variant, layout] = Pipeline.load(base, device="cpu", loras=[(lora, 0.8)])
        elif layout == "diffusers":  # the repository as a user gives it
            PIPES[variant, layout] = Pipeline.load(root, device="cpu")
        else:
            PIPES[variant, layout] = Pipeline.load(root, device="cpu", transformer=files[layout])
    return PIPES[variant, layout]


def theirs(root, cls):
    import diffusers
    if (root, cls) not in PIPES:
        PIPES[root, cls] = getattr(diffusers, cls).from_pretrained(root, dtype=torch.float32)
        PIPES[root, cls].set_progress_bar_config(disable=True)
    return PIPES[root, cls]


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def picture(w, h, seed=0):
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1.0, 0.5, 0.2]
    return Image.fromarray(np.clip(base + g.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


def soft_mask(w, h):
    """Grey values around 0.5, so resizing before binarizing (diffusers' order) matters."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray((255 * np.clip((xx - w / 3) / (w / 3), 0, 1)).astype(np.uint8), "L")


# --------------------------------------------------------------------------------------------------------- Fill

@pytest.mark.parametrize("layout", LAYOUTS)
def test_fill_matches_diffusers(repos, layout):
    """A 70x52 image and its soft mask resized to 48x64, two images from one generator (three draws: image
    sample, noise, masked-image sample), 3 steps: latents to 1e-4."""
    pipe = ours(repos, "fill", layout)
    image, mask = picture(70, 52), soft_mask(70, 52)
    a = pipe.fill(image, mask, "a red armchair", height=64, width=48, steps=3, seed=5, num_images=2,
                  return_latents=True)
    b = theirs(repos["fill"][0], "FluxFillPipeline")(
        prompt="a red armchair", image=image, mask_image=mask, height=64, width=48, num_inference_steps=3,
        guidance_scale=30.0, generator=gen(5), num_images_per_prompt=2, output_type="latent",
        max_sequence_length=512).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_fill_images_strength_and_outpaint(repos):
    pipe = ours(repos, "fill", "bfl")
    ref = theirs(repos["fill"][0], "FluxFillPipeline")
    image, mask = picture(48, 32, 1), soft_mask(48, 32)
    a = np.stack([np.asarray(im, np.float32) / 255 for im in pipe.fill(image, mask, "x", steps=2, seed=1)])
    b = ref(prompt="x", image=image, mask_image=mask, height=32, width=48, num_inference_steps=2,
            generator=gen(1), output_type="np", max_sequence_length=512).images
    assert a.shape == b.shape == (1, 32, 48, 3) and np.abs(a - b).mean() <= 1 / 255 and a.std() > 0.02
    a = pipe.fill(image, mask, "x", steps=4, seed=2, strength=0.5, guidance=10.0, return_latents=True)
    b = ref(prompt="x", image=image, mask_image=mask, height=32, width=48, num_inference_steps=4, strength=0.5,
            guidance_scale=10.0, generator=gen(2), output_type="latent", max_sequence_length=512).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # outpainting: the image pasted on the canvas (regions.outpaint_canvas), the mask = the new area
    from minidit.regions import outpaint_canvas
    from minidit.masks import image_tensor
    full, area = outpaint_canvas(image_tensor(image), (64, 48), (16, 0))
    canvas = Image.fromarray(((full.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    new = Image.fromarray(((1 - area) * 255).byte().numpy(), "L")
    a = pipe.fill_outpaint(image, "x", (64, 48), offset=(16, 0), steps=2, seed=3, return_latents=True)
    b = ref(prompt="x", image=canvas, mask_image=new, height=48, width=64, num_inference_steps=2,
            generator=gen(3), output_type="latent", max_sequence_length=512).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_pack_mask_is_each_tokens_16x16_pixels():
    m = torch.zeros(1, 1, 32, 48)
    m[0, 0, 16 + 3, 16 + 9] = 1  # token (1, 1): its 2x2 latent pixels' 8x8 blocks
    p = family.pack_mask(m)
    assert p.shape == (1, 6, 256) and p.sum() == 1 and p[0, 4].sum() == 1  # token 1 * 3 + 1
    # channel = (8x8 block position) * 4 + (latent pixel in the 2x2): latent pixel (0, 1) -> ph 0, pw 1
    assert p[0, 4, (3 * 8 + 1) * 4 + 1] == 1


# ------------------------------------------------------------------------------------------------------ Control

@pytest.mark.parametrize("layout", [*LAYOUTS, "lora"])
def test_control_matches_diffusers(repos, layout):
    """Depth model in each layout, and dev + BFL's control LoRA (oracle: BFL's definition merged): the control
    image's one VAE sample for the batch is drawn before the noise."""
    variant = "dev+lora" if layout == "lora" else "depth"
    pipe = ours(repos, variant, layout)
    assert pipe.transformer.cfg.variant == "control"
    control = picture(48, 64, 2)
    a = pipe.generate("a robot", control_image=control, steps=3, seed=7, num_images=2, return_latents=True)
    b = theirs(repos[variant][0], "FluxControlPipeline")(
        prompt="a robot", control_image=control, height=64, width=48, num_inference_steps=3, guidance_scale=3.5,
        generator=gen(7), num_images_per_prompt=2, output_type="latent", max_sequence_length=512).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_control_images_and_seed_lists(repos):
    pipe, ref = ours(repos, "depth", "bfl"), theirs(repos["depth"][0], "FluxControlPipeline")
    control = picture(32, 32, 3)
    a = np.stack([np.asarray(im, np.float32) / 255 for im in pipe.generate("x", control_image=control, steps=2)])
    b = ref(prompt="x", control_image=control, height=32, width=32, num_inference_steps=2, generator=gen(0),
            output_type="np", max_sequence_length=512).images
    assert np.abs(a - b).mean() <= 1 / 255
    # a seed list: image i is a one-image run with seed i (its control sample and noise from its own generator)
    two = pipe.generate("x", control_image=control, steps=2, seed=[4, 9], num_images=2, return_latents=True)
    one = pipe.generate("x", control_image=control, steps=2, seed=9, return_latents=True)
    torch.testing.assert_close(two[1:], one, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------ Kontext

@pytest.mark.parametrize("layout", LAYOUTS)
def test_kontext_matches_diffusers(repos, layout):
    """One reference at its own (floored) size, the output by diffusers' ~max_area rule, guidance 3.5 (diffusers'
    default; minidit's is BFL's 2.5), true CFG in the diffusers-layout case."""
    pipe = ours(repos, "kontext", layout)
    assert pipe.transformer.cfg.variant == "kontext"
    image = picture(53, 37, 4)  # floored to 48 x 32
    cfg = dict(negative_prompt="blurry", true_cfg_scale=2.0) if layout == "diffusers" else {}
    a = pipe.kontext(image, "add a hat", height=64, width=48, max_area=48 * 64, auto_resize=False, steps=3,
                     guidance=3.5, seed=3, num_images=2, return_latents=True, **cfg)
    b = theirs(repos["kontext"][0], "FluxKontextPipeline")(
        image=image, prompt="add a hat", height=64, width=48, max_area=48 * 64, _auto_resize=False,
        num_inference_steps=3, guidance_scale=3.5, generator=gen(3), num_images_per_prompt=2,
        output_type="latent", max_sequence_length=512, **cfg).images
    assert a.shape == (2, 12, 64)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kontext_preferred_resolution_and_image(repos, monkeypatch):
    """The preferred-resolution resize of the reference (diffusers' default `_auto_resize`) and the ~max_area
    output rule; decoded images within 1/255 with both lists of preferred resolutions patched to small sizes
    (the real ones, ~1 MP, cost 30 s on CPU here)."""
    pipe, ref = ours(repos, "kontext", "bfl"), theirs(repos["kontext"][0], "FluxKontextPipeline")
    assert family.kontext_reference_size(100, 200) == (720, 1456)   # |0.5 - 720/1456| is the smallest
    assert family.kontext_reference_size(1000, 1000) == (1024, 1024)
    assert family.kontext_output_size(1024, 1024) == (1024, 1024)
    assert family.kontext_output_size(512, 1024, 256 * 256) == (176, 352)  # round(√(65536·2)) = 362 -> 352
    small = [(32, 64), (48, 48), (64, 32), (80, 16)]
    monkeypatch.setattr(family, "PREFERRED_KONTEXT_RESOLUTIONS", small)
    monkeypatch.setattr("diffusers.pipelines.flux.pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS", small)
    image = picture(40, 24, 5)  # floored to 32 x 16, aspect 2: 64 x 32 of the small list
    assert family.kontext_reference_size(40, 24) == (64, 32)
    a = np.stack([np.asarray(im, np.float32) / 255 for im in pipe.kontext(
        image, "x", height=32, width=48, max_area=32 * 48, steps=2, guidance=3.5)])
    b = ref(image=image, prompt="x", height=32, width=48, max_area=32 * 48, num_inference_steps=2,
            guidance_scale=3.5, generator=gen(0), output_type="np", max_sequence_length=512).images
    assert a.shape == b.shape == (1, 32, 48, 3) and np.abs(a - b).mean() <= 1 / 255


def test_kontext_several_references_by_their_offsets(repos):
    """ComfyUI's "offset" placement: every reference at index 1, each next one right of or below the union of
    the ones before, no position shared; one reference in a list is the single-image result; and the run
    with two references is exactly denoise over [image; ref A; ref B] with those ids."""
    ids = family.kontext_ids([(2, 3), (4, 2), (1, 1)])
    a, b, c = ids[:6], ids[6:14], ids[14:]
    assert (ids[:, 0] == 1).all()
    assert a[:, 1:].tolist() == [[r, q] for r in range(2) for q in range(3)]                  # own grid
    assert b[:, 1:].tolist() == [[r, 3 + q] for r in range(4) for q in range(2)]              # right: 4+2 > 2+3
    assert c[:, 1:].tolist() == [[4, 0]]                                                     # below: 1+4 <= 1+5
    assert len({tuple(x) for x in ids.tolist()}) == len(ids)
    pipe = ours(repos, "kontext", "bfl")
    A, B = picture(48, 32, 6), picture(32, 64, 7)
    kw = dict(height=32, width=32, max_area=32 * 32, auto_resize=False, steps=2, seed=1, return_latents=True)
    one = pipe.kontext(A, "x", **kw)
    torch.testing.assert_close(pipe.kontext([A], "x", **kw), one, atol=0, rtol=0)
    two = pipe.kontext([A, B], "x", **kw)
    assert not torch.allclose(two, one, atol=1e-3)
    from minidit.image import pil_to_tensor
    refs = torch.cat([pipe.encode_image(pil_to_tensor(A)), pipe.encode_image(pil_to_tensor(B))], dim=1)
    ids = family.kontext_ids([(2, 3), (4, 2)])[None]
    assert ids[0, 6:, 2].min() == 3  # B (4 rows x 2 cols) right of A (2 x 3)
    txt, txt_ids, vec = pipe.encode_prompt("x")
    by_hand = pipe.denoise(sampling.noise(1, 32, 32, 1), sampling.image_ids(1, 32, 32), txt, txt_ids, vec,
                           pipe.schedule(2, 32, 32), 2.5, img_cond_seq=refs, img_cond_seq_ids=ids)
    torch.testing.assert_close(two, by_hand, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_are_one_named_line_before_sampling(repos, tmp_path, monkeypatch):
    fill, depth = ours(repos, "fill", "bfl"), ours(repos, "depth", "bfl")
    dev = Pipeline.load(repos["dev+lora"][1]["lora"][0], device="cpu")
    calls = []
    monkeypatch.setattr(sampling, "denoise", lambda *a, **k: calls.append(1))  # no sampling may start
    image = picture(32, 32)
    with pytest.raises(ValueError, match=r"pipe.fill needs a FLUX.1 fill model; .* is a FLUX.1 dev model"):
        dev.fill(image, soft_mask(32, 32), "x")
    with pytest.raises(ValueError, match=r"control image .*: 32x32 \(WxH\), but the output is 48x32"):
        depth.generate("x", control_image=image, width=48)
    with pytest.raises(ValueError, match=r"FLUX.1 control \(Depth/Canny\) model: pass control_image="):
        depth.generate("x")
    with pytest.raises(ValueError, match=r"control_image needs a FLUX.1 control model.*FLUX.1 dev model"):
        dev.generate("x", control_image=image)
    with pytest.raises(ValueError, match=r"generate: .* is a FLUX.1 fill model: use pipe.fill"):
        fill.generate("x")
    with pytest.raises(ValueError, match=r"img2img runs on FLUX.1 dev/schnell/Kontext; .* FLUX.1 control model"):
        depth.img2img(image, "x")
    with pytest.raises(ValueError, match=r"personalize runs on FLUX.1 dev/schnell/Kontext; .* FLUX.1 fill model"):
        fill.personalize("x", Reference(image))
    with pytest.raises(ValueError, match=r"pipe.kontext needs a FLUX.1 kontext model"):
        dev.kontext(image, "x")
    with pytest.raises(ValueError, match=r"mask size 16x16 \(HxW\) differs from the image size 32x32"):
        fill.fill(image, soft_mask(16, 16), "x")
    assert not calls
    # LoRAs: another model's widths, unknown keys, NaN: named before any model is built
    from safetensors.torch import save_file
    root = repos["dev+lora"][1]["lora"][0]
    other = TINY.__class__(**{**TINY.__dict__, "hidden_size": 128, "num_heads": 8})  # another model's widths
    wide = write_tiny_lora(tmp_path / "wide.safetensors", other, "diffusers")
    save_file({"transformer.foo.lora_A.weight": torch.ones(2, 2), "transformer.foo.lora_B.weight": torch.ones(2, 2)},
              str(tmp_path / "unknown.safetensors"))
    nan = write_tiny_lora(tmp_path / "nan.safetensors", TINY, "kohya")
    sd = load_file(nan)
    sd[next(iter(sd))][0, 0] = float("nan")
    save_file(sd, str(nan))
    monkeypatch.setattr("minidit.flux_loading.load_streaming", lambda *a, **k: calls.append(1))
    for path, msg in ((wide, r"wide.safetensors: shapes for another model"),
                      (tmp_path / "unknown.safetensors", r"unknown.safetensors: .*not FLUX.1 transformer LoRA.*foo"),
                      (nan, r"nan.safetensors: tensor .* holds NaN")):
        with pytest.raises(CheckpointError, match=msg):
            Pipeline.load(root, device="cpu", loras=[(path, 1.0)])
    assert not calls


# ------------------------------------------------------------------------------------------ FreeCus on the family

def test_freecus_on_fill(repos):
    """§4.4: the reference branch is a Fill pass with an all-black mask (the whole reference visible, nothing to
    repaint: it reconstructs the reference); attention sharing changes the inpainted region only (the scene's
    tokens outside the region are kept)."""
    pipe = ours(repos, "fill", "bfl")
    scene, ref = picture(32, 32, 8), picture(32, 32, 9)
    region = Image.new("L", (32, 32), 0)
    region.paste(255, (0, 0, 16, 32))  # the left token column
    x_ref = family.image_tensor(ref)
    ref_cond, cond, finish = family.freecus_conditioning(pipe, x_ref, 2, 0, image=scene, mask=region)
    torch.testing.assert_close(ref_cond[..., :64], pipe.encode_image(x_ref[None]))  # the reference itself
    assert ref_cond[..., 64:].abs().max() == 0 and cond.shape == (2, 4, 320)       # black mask: nothing to repaint
    assert cond[0, 0, 64:].min() == 1 and cond[0, 1, 64:].max() == 0               # token 0 repaints, token 1 not
    kw = dict(image=scene, mask=region, steps=2, height=32, width=32, return_latents=True)
    a = pipe.freecus("a dog", Reference(ref, mask=(0, 0, 32, 32)), **kw)
    b = pipe.freecus("a dog", Reference(picture(32, 32, 10), mask=(0, 0, 32, 32)), **kw)
    keep = torch.tensor([False, True, False, True])  # tokens (0, 1) and (1, 1) lie wholly outside the region
    scene_latents = pipe.encode_image(family.image_tensor(scene)[None])
    assert torch.equal(a[:, keep], scene_latents[:, keep]) and torch.equal(b[:, keep], a[:, keep])
    assert not torch.allclose(a[:, ~keep], b[:, ~keep], atol=1e-3)  # the subject's reference matters inside


def test_freecus_on_control(repos):
    pipe = ours(repos, "depth", "bfl")
    ref, depth = picture(32, 32, 11), picture(32, 32, 12)
    kw = dict(steps=2, height=32, width=32, return_latents=True)
    a = pipe.freecus("a dog", Reference(ref, mask=(0, 0, 16, 16)), control_image=depth, **kw)
    b = pipe.freecus("a dog", Reference(ref, mask=(0, 0, 16, 16)), control_image=depth,
                     reference_control=picture(32, 32, 13), **kw)
    assert a.shape == (1, 4, 64) and torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="needs control_image="):
        pipe.freecus("a dog", Reference(ref, mask=(0, 0, 16, 16)), **kw)


# ------------------------------------------------------------------------------------------------------- CLI

def test_cli_family_commands_and_lora_record(repos, tmp_path, monkeypatch):
    from minidit.cli import main
    from minidit.cli.record import read_png
    from minidit.lora import header_fingerprint
    picture(40, 32, 1).save(tmp_path / "room.png")
    soft_mask(40, 32).save(tmp_path / "mask.png")
    picture(32, 32, 2).save(tmp_path / "depth.png")
    soft_mask(32, 32).save(tmp_path / "region.png")
    fast = ["--steps", "1", "--seed", "3", "--quiet"]
    main(["fill", "--weights", str(repos["fill"][0]), "--image", str(tmp_path / "room.png"), "--mask",
          str(tmp_path / "mask.png"), "--prompt", "a chair", *fast, "--output", str(tmp_path / "fill.png")])
    rec = read_png(tmp_path / "fill.png")
    assert (rec["command"], rec["width"], rec["height"], rec["guidance"]) == ("fill", 32, 32, 30.0)
    main(["fill", "--weights", str(repos["fill"][0]), "--image", str(tmp_path / "room.png"), "--canvas", "64x32",
          *fast, "--prompt", "a room", "--output", str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (64, 32)
    base, lora = repos["dev+lora"][1]["lora"]
    main(["generate", "--weights", str(base), "--lora", f"{lora}:0.8", "--control", str(tmp_path / "depth.png"),
          "--prompt", "a robot", *fast, "--output", str(tmp_path / "control.png")])
    rec = read_png(tmp_path / "control.png")
    assert rec["weights"]["loras"] == [{"file": lora.name, "fingerprint": header_fingerprint(lora), "scale": 0.8}]
    assert rec["inputs"]["control"][0]["file"] == "depth.png" and (rec["width"], rec["height"]) == (32, 32)
    assert f"Lora hashes: \"{lora.name}\\u003a {header_fingerprint(lora)} x0.8\"" in \
        Image.open(tmp_path / "control.png").text["parameters"]
    same = ours(repos, "dev+lora", "lora").generate("a robot", control_image=tmp_path / "depth.png", steps=1, seed=3)
    assert np.array_equal(np.asarray(same[0]), np.asarray(Image.open(tmp_path / "control.png").convert("RGB")))
    for png, extra in (("fill.png", []), ("control.png", ["--lora", f"{lora}:0.8"])):  # --from-png: the same pixels
        main(["fill" if png == "fill.png" else "generate", "--from-png", str(tmp_path / png), "--weights",
              str(repos["fill"][0] if png == "fill.png" else base), *extra, "--quiet", "--output",
              str(tmp_path / f"again-{png}")])
        assert np.array_equal(np.asarray(Image.open(tmp_path / png)), np.asarray(Image.open(tmp_path / f"again-{png}")))
    monkeypatch.setattr(family, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 32)])  # the real ones are ~1 MP: slow
    main(["kontext", "--weights", str(repos["kontext"][0]), "--image", str(tmp_path / "room.png"), "--image",
          str(tmp_path / "depth.png"), "--prompt", "x", *fast,
          "--output", str(tmp_path / "k.png")])
    rec = read_png(tmp_path / "k.png")
    assert rec["command"] == "kontext" and rec["guidance"] == 2.5 and len(rec["inputs"]["image"]) == 2
    assert (rec["width"], rec["height"]) == (32, 32)  # the first reference's preferred resolution (patched)
    picture(48, 24, 2).save(tmp_path / "wide.png")      # floored to 48 x 16; its preferred resolution is 32 x 32
    main(["kontext", "--weights", str(repos["kontext"][0]), "--image", str(tmp_path / "wide.png"), "--prompt", "x",
          "--no-auto-resize", *fast, "--output", str(tmp_path / "k-own.png")])
    rec = read_png(tmp_path / "k-own.png")
    assert (rec["width"], rec["height"]) == (48, 16) and rec["settings"]["auto_resize"] is False
    main(["kontext", "--weights", str(repos["kontext"][0]), "--image", str(tmp_path / "wide.png"), "--prompt", "x",
          "--height", "32", "--width", "64", "--max-area", "1024", *fast, "--output", str(tmp_path / "k-area.png")])
    rec = read_png(tmp_path / "k-area.png")
    assert (rec["width"], rec["height"]) == (32, 16) and rec["settings"]["max_area"] == 1024  # 2:1 at ~1024 px, floored to 16
    main(["kontext", "--from-png", str(tmp_path / "k-own.png"), "--weights", str(repos["kontext"][0]), "--quiet",
          "--output", str(tmp_path / "k-own-again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "k-own.png")),
                          np.asarray(Image.open(tmp_path / "k-own-again.png")))
    main(["freecus", "--weights", str(repos["fill"][0]), "--ref", str(tmp_path / "depth.png"), "--scene",
          str(tmp_path / "depth.png"), "--region", str(tmp_path / "region.png"), "--prompt", "a dog", *fast,
          "--output", str(tmp_path / "fc.png")])
    rec = read_png(tmp_path / "fc.png")
    assert rec["guidance"] == 30.0 and rec["inputs"]["region"][0]["file"] == "region.png"
    monkeypatch.setattr(Pipeline, "load", lambda *a, **k: pytest.fail("loaded before the error"))
    with pytest.raises(SystemExit, match=r"minidit fill needs a FLUX.1 Fill model .*; the weights are FLUX.1 dev"):
        main(["fill", "--weights", str(base), "--image", str(tmp_path / "room.png"), "--mask",
              str(tmp_path / "mask.png"), "--prompt", "x", *fast, "--output", str(tmp_path / "no.png")])
    with pytest.raises(SystemExit, match=r"minidit kontext needs a FLUX.1 Kontext model .*; the weights are FLUX.1 fill"):
        main(["kontext", "--weights", str(repos["fill"][0]), "--image", str(tmp_path / "room.png"), "--prompt", "x",
              *fast, "--output", str(tmp_path / "no.png")])
    with pytest.raises(SystemExit, match=r"--max-area must be"):
        main(["kontext", "--weights", str(repos["kontext"][0]), "--image", str(tmp_path / "room.png"), "--prompt",
              "x", "--max-area", "10", *fast, "--output", str(tmp_path / "no.png")])
    with pytest.raises(SystemExit, match=r"fill needs --mask \(inpaint\) or --canvas"):
        main(["fill", "--weights", str(repos["fill"][0]), "--image", str(tmp_path / "room.png"), "--prompt", "x",
              *fast, "--output", str(tmp_path / "no.png")])
