"""End to end: minidit's Pipeline vs diffusers' FluxPipeline on tiny official-layout folders; CLI; weights lookup."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from minidit.cli import main
from minidit.loading import CheckpointError
from minidit.pipeline import Pipeline
from minidit.repository import resolve_weights
from minidit.weights.tiny import write_tiny_repo


@pytest.fixture(scope="session")
def dev_repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("tiny") / "FLUX.1-dev", "dev", seed=0)


@pytest.fixture(scope="session")
def schnell_repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("tiny") / "FLUX.1-schnell", "schnell", seed=1)


def diffusers_images(root, prompts, height, width, steps, guidance, seed, num_images, max_len):
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(root, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=num_images,
               max_sequence_length=max_len, output_type="np").images
    return out  # (B, H, W, 3) float in [0, 1]


@pytest.mark.parametrize("variant,prompts,height,width,steps,num_images", [
    ("dev", "a photo of a cat wearing a red hat", 64, 64, 4, 1),
    ("dev", ["a red car on a beach, 4k!", "an empty room"], 96, 64, 3, 1),   # non-square, batch of 2
    ("schnell", "a corgi astronaut", 64, 128, 4, 2),                          # no guidance, 2 images per prompt
])
def test_images_match_diffusers(request, variant, prompts, height, width, steps, num_images):
    root = request.getfixturevalue(f"{variant}_repo")
    pipe = Pipeline.load(root, device="cpu")
    assert pipe.variant == variant
    ours = pipe.generate(prompts, height=height, width=width, steps=steps, guidance=3.5, seed=11,
                         num_images=num_images)
    theirs = diffusers_images(root, prompts, height, width, steps, 3.5, 11, num_images,
                              512 if variant == "dev" else 256)
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in ours])
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).mean() <= 1 / 255
    assert ours.std() > 0.02  # not a flat image


def test_latents_match_diffusers_closely(dev_repo):
    """The same comparison before decoding, so a small error cannot hide under 8-bit rounding."""
    from diffusers import FluxPipeline
    pipe = Pipeline.load(dev_repo, device="cpu")
    ours = pipe.generate("a bowl of berries", height=64, width=80, steps=3, seed=3, return_latents=True)
    ref = FluxPipeline.from_pretrained(dev_repo, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a bowl of berries", height=64, width=80, num_inference_steps=3, guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_seed_changes_image_and_is_reproducible(dev_repo):
    pipe = Pipeline.load(dev_repo, device="cpu")
    a = pipe.generate("x", height=32, width=32, steps=2, seed=1, return_latents=True)
    b = pipe.generate("x", height=32, width=32, steps=2, seed=1, return_latents=True)
    c = pipe.generate("x", height=32, width=32, steps=2, seed=2, return_latents=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_resolution_error_before_any_work(dev_repo):
    pipe = Pipeline.load(dev_repo, device="cpu")
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate("x", height=100, width=64)


def test_builtin_tiny_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDIT_CACHE", str(tmp_path))
    pipe = Pipeline.load()  # the built-in default: the trained tiny model shipped in weights/trained
    assert "trained" in pipe.name and pipe.variant == "schnell" and pipe.default_steps == 28  # dynamic shift
    (img,) = pipe.generate("", height=32, width=48, steps=1)  # empty prompt allowed
    assert img.size == (48, 32)
    from minidit.weights.tiny import tiny_repo  # the random one still exists for the parity tests
    assert Pipeline.load(tiny_repo(), device="cpu").variant == "dev"
    assert (tmp_path / "tiny-flux-dev-v1" / "flux1-dev.safetensors").exists()


def test_hf_cache_resolution(tmp_path, monkeypatch, dev_repo):
    cache = tmp_path / "hub"
    snap = cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    shutil.copytree(dev_repo, snap)
    (cache / "models--black-forest-labs--FLUX.1-dev" / "refs").mkdir()
    (cache / "models--black-forest-labs--FLUX.1-dev" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert resolve_weights("black-forest-labs/FLUX.1-dev") == snap
    assert resolve_weights(cache / "models--black-forest-labs--FLUX.1-dev") == snap
    assert Pipeline.load("black-forest-labs/FLUX.1-dev", device="cpu").variant == "dev"
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve_weights("black-forest-labs/FLUX.1-schnell")


def test_explicit_component_paths_and_diffusers_only_folder(tmp_path, dev_repo):
    only_diffusers = tmp_path / "d"
    shutil.copytree(dev_repo, only_diffusers, ignore=shutil.ignore_patterns("flux1-*", "ae.safetensors"))
    a = Pipeline.load(only_diffusers, device="cpu").generate("hi", height=32, width=32, steps=2, return_latents=True)
    b = Pipeline.load(tmp_path / "d", device="cpu", transformer=dev_repo / "flux1-dev.safetensors",
                      ae=dev_repo / "ae.safetensors").generate("hi", height=32, width=32, steps=2, return_latents=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_incomplete_weights_named(tmp_path, dev_repo):
    broken = tmp_path / "b"
    shutil.copytree(dev_repo, broken, ignore=shutil.ignore_patterns("text_encoder_2", "tokenizer_2"))
    with pytest.raises(CheckpointError, match=r"missing text_encoder_2 .*tokenizer_2"):
        Pipeline.load(broken, device="cpu")


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_generate_writes_png_with_metadata(tmp_path, dev_repo, capsys):
    out = tmp_path / "o.png"
    main(["generate", "--prompt", "a cat", "--weights", str(dev_repo), "--height", "32", "--width", "48",
          "--steps", "2", "--seed", "5", "--output", str(out), "--num-images", "2"])
    files = sorted(tmp_path.glob("o-*.png"))
    assert [f.name for f in files] == ["o-0.png", "o-1.png"]
    im = Image.open(files[1])
    assert im.size == (48, 32)
    assert "prompt" not in im.text and im.text["seed"] == "6" and im.text["steps"] == "2"  # seed + i; no ComfyUI key
    assert im.text["guidance"] == "3.5" and im.text["size"] == "48x32" and im.text["image_index"] == "1"
    assert im.text["minidit_version"] and im.text["model"] == dev_repo.name  # a name, never where it is
    assert json.loads(im.text["minidit"])["prompt"] == "a cat" and im.text["parameters"].startswith("a cat\n")
    assert "it/s" in capsys.readouterr().err  # the progress bar


@pytest.mark.parametrize("argv,message", [
    (["--height", "100"], "multiples of 16"),
    (["--weights", "/nonexistent/flux"], "weights not found"),
    (["--weights", "nobody/no-such-model"], "not in the local Hugging Face cache"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--output", "picture.jpg"], "--output must be a .png file"),
])
def test_cli_errors_are_named(tmp_path, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--output", str(tmp_path / "o.png"), "--steps", "1", "--height", "32",
              "--width", "32", *argv])
    assert message in str(e.value)


def test_cli_info(tmp_path, dev_repo, capsys):
    main(["info", str(dev_repo)])
    out = capsys.readouterr().out
    assert "variant: FLUX.1-dev" in out and "complete: yes" in out and "M params" in out
    broken = tmp_path / "b"
    shutil.copytree(dev_repo, broken, ignore=shutil.ignore_patterns("ae.safetensors", "vae"))
    with pytest.raises(SystemExit) as e:  # incomplete: exit code 1
        main(["info", str(broken)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "ae              MISSING" in out and "complete: no (missing ae)" in out


def test_offload_moves_one_component_at_a_time_and_restores_it(dev_repo, monkeypatch):
    """offload=True: components live on the CPU; `use` puts one on the pipeline device for its block and puts the
    original CPU tensors back afterwards (no copy back). On this CPU-only machine the "GPU" is the CPU, so this
    checks the bookkeeping and that results are unchanged; the GPU memory numbers are in the README."""
    pipe = Pipeline.load(dev_repo, device="cpu", offload=True)
    plain = Pipeline.load(dev_repo, device="cpu")
    for comp in (pipe.transformer, pipe.ae, pipe.text):
        mods = [comp.t5, comp.clip] if comp is pipe.text else [comp]
        before = [p.data for m in mods for p in m.parameters()]
        moved = []
        monkeypatch.setattr(torch.Tensor, "to", _spy(torch.Tensor.to, moved), raising=True)
        with pipe.use(comp):
            pass
        monkeypatch.undo()
        after = [p.data for m in mods for p in m.parameters()]
        assert len(moved) == len(before)                      # every weight was sent to the device once
        assert [a.data_ptr() for a in before] == [b.data_ptr() for b in after]  # CPU originals back, not copies
    a = pipe.generate("x", height=32, width=32, steps=2, return_latents=True)
    b = plain.generate("x", height=32, width=32, steps=2, return_latents=True)
    assert torch.equal(a, b)


def _spy(fn, calls):
    def to(self, *args, **kw):
        calls.append(args[0] if args else kw.get("device"))
        return fn(self, *args, **kw)
    return to


def test_cli_output_without_suffix_gets_png(tmp_path, dev_repo):
    main(["generate", "--prompt", "x", "--weights", str(dev_repo), "--height", "32", "--width", "32", "--steps", "1",
          "--output", str(tmp_path / "picture")])
    assert Image.open(tmp_path / "picture.png").text["steps"] == "1"


def test_generate_argument_errors(dev_repo):
    pipe = Pipeline.load(dev_repo, device="cpu")
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        pipe.generate("x", height=32, width=32, num_images=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        pipe.generate("x", height=32, width=32, steps=0)


def test_component_overrides_relative_to_root_and_preferences(tmp_path, dev_repo):
    root = tmp_path / "r"
    shutil.copytree(dev_repo, root)
    # an fp8-named sibling sorts before flux1-dev.safetensors but must not be picked over the exact name
    shutil.copy(root / "flux1-dev.safetensors", root / "flux1-dev-bad.safetensors")
    (root / "flux1-dev-bad.safetensors").write_bytes(b"not a checkpoint")
    from minidit.repository import WeightPaths
    assert WeightPaths.find(root).transformer == root / "flux1-dev.safetensors"
    (root / "flux1-dev.safetensors").rename(root / "flux1-dev-fp32.safetensors")
    (root / "flux1-dev-bad.safetensors").unlink()
    p = WeightPaths.find(root, transformer="flux1-dev-fp32.safetensors")  # relative to the root
    assert p.transformer == root / "flux1-dev-fp32.safetensors"
    assert Pipeline.load(root, device="cpu", transformer="flux1-dev-fp32.safetensors").variant == "dev"
    with pytest.raises(ValueError, match="unknown component"):
        WeightPaths.find(root, vae="x")
