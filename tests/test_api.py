"""The diffusers-shaped interface against diffusers itself on tiny checkpoints: true CFG, `pipe(...)`, generators,
output types, the schedule from scheduler_config.json, img2img; the loaders' shared defaults; `python -m minidit`."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minidit import load_autoencoder, load_clip, load_t5, load_transformer
from minidit.cli import main
from minidit.image import pil_to_tensor
from minidit.loading import CheckpointError, default_device_dtype
from minidit.pipeline import Pipeline
from minidit.sampling import FlowSchedule, denoise, image_ids, noise
from minidit.weights.tiny import SCHEDULERS, write_tiny_repo


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    dyn = write_tiny_repo(d / "schnell-dynamic", "schnell", seed=2)  # no guidance embedding, dev's dynamic shift
    (dyn / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULERS["dev"]))
    return {"dev": write_tiny_repo(d / "dev", "dev", seed=0), "schnell-dynamic": dyn}


@pytest.fixture(scope="module")
def pipes(repos):
    return {k: Pipeline.load(v, device="cpu") for k, v in repos.items()}


_DIFFUSERS = {}


def diffusers_pipe(root, cls="FluxPipeline"):
    if (root, cls) not in _DIFFUSERS:
        import diffusers
        pipe = getattr(diffusers, cls).from_pretrained(root, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        _DIFFUSERS[root, cls] = pipe
    return _DIFFUSERS[root, cls]


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


# ------------------------------------------------------------------------------------------------ true CFG

@pytest.mark.parametrize("name,prompt,negative,num_images", [
    ("schnell-dynamic", "a red fox in the snow", "blurry, low quality", 2),
    ("schnell-dynamic", "a red fox in the snow", "", 1),                      # "" counts as a negative prompt
    ("dev", ["a blue bird", "a green car"], ["grey", "a truck"], 1),         # guidance embedding and true CFG
])
def test_true_cfg_matches_diffusers(repos, pipes, name, prompt, negative, num_images):
    pipe = pipes[name]
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, num_images_per_prompt=num_images,
              negative_prompt=negative, true_cfg_scale=4.0, output_type="latent")
    ours = pipe(prompt, generator=gen(7), **kw).images
    theirs = diffusers_pipe(repos[name])(prompt, generator=gen(7), max_sequence_length=pipe.text.max_length,
                                         **kw).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    plain = pipe(prompt, generator=gen(7), **{**kw, "negative_prompt": None}).images
    assert (ours - plain).abs().mean() > 1e-3  # the guidance did something


def test_true_cfg_scale_one_is_no_cfg(pipes):
    pipe = pipes["schnell-dynamic"]
    kw = dict(height=32, width=32, steps=2, seed=3, return_latents=True)
    plain = pipe.generate("a cat", **kw)
    assert torch.equal(pipe.generate("a cat", negative_prompt="a dog", true_cfg_scale=1.0, **kw), plain)
    # the formula itself: v_neg + 1·(v - v_neg) is v (up to rounding) in sampling.denoise
    txt, txt_ids, vec = pipe.encode_prompt(["a cat"])
    neg = pipe.encode_prompt(["a dog"])
    x, ids, ts = noise(1, 32, 32, 3), image_ids(1, 32, 32), pipe.schedule(2, 32, 32)
    a = denoise(pipe.transformer, x, ids, txt, txt_ids, vec, ts, None)
    b = denoise(pipe.transformer, x, ids, txt, txt_ids, vec, ts, None, negative=neg, true_cfg_scale=1.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # (that CFG > 1 changes it: the parity test above)


def test_negative_prompt_count_checked(pipes):
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        pipes["dev"].generate("x", height=32, width=32, steps=1, negative_prompt=["a", "b"], true_cfg_scale=2)


# -------------------------------------------------------------------------------- the diffusers-shaped call

def test_call_matches_diffusers_with_a_generator_list(repos, pipes):
    kw = dict(height=32, width=48, num_inference_steps=2, guidance_scale=3.5, num_images_per_prompt=2,
              output_type="np")
    ours = pipes["dev"]("a bowl of berries", generator=[gen(1), gen(2)], **kw).images
    theirs = diffusers_pipe(repos["dev"])("a bowl of berries", generator=[gen(1), gen(2)], **kw).images
    assert ours.shape == theirs.shape == (2, 32, 48, 3)
    assert np.abs(ours - theirs).mean() <= 1 / 255 and ours.std() > 0.02


def test_generator_semantics(pipes):
    pipe = pipes["dev"]
    kw = dict(height=32, width=32, num_inference_steps=2, output_type="latent")
    one = pipe("x", generator=gen(3), num_images_per_prompt=2, **kw).images  # one generator for the batch
    assert torch.equal(one, pipe.generate("x", 32, 32, 2, seed=3, num_images=2, return_latents=True))
    pair = pipe("x", generator=[gen(5), gen(6)], num_images_per_prompt=2, **kw).images  # one per image
    alone = pipe("x", generator=[gen(6)], **kw).images  # (a batch of 1 vs 2 changes only float rounding)
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=1e-5)
    assert (pair[:1] - alone).abs().mean() > 0.1
    assert torch.equal(noise(2, 32, 32, [gen(5), gen(6)])[1:], noise(1, 32, 32, [gen(6)]))
    start = noise(1, 32, 32, 9)  # latents= replaces the drawn noise
    assert torch.equal(pipe("x", latents=start, **kw).images, pipe("x", generator=gen(9), **kw).images)
    with pytest.raises(ValueError, match="latents must be packed noise of shape"):
        pipe("x", latents=start, num_images_per_prompt=2, **kw)
    with pytest.raises(ValueError, match="got 1 seeds/generators for 2 images"):
        pipe("x", generator=[gen(1)], num_images_per_prompt=2, **kw)


def test_output_types(pipes):
    pipe = pipes["dev"]
    kw = dict(height=32, width=48, num_inference_steps=1, num_images_per_prompt=2)
    pil = pipe("x", generator=gen(0), **kw).images
    arr = pipe("x", generator=gen(0), output_type="np", **kw).images
    pt = pipe("x", generator=gen(0), output_type="pt", **kw).images
    assert [im.size for im in pil] == [(48, 32)] * 2 and arr.shape == (2, 32, 48, 3) and pt.shape == (2, 3, 32, 48)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(arr)) and 0 <= arr.min() and arr.max() <= 1
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe("x", output_type="numpy", **kw)


# ----------------------------------------------------------------------------- schedule from scheduler config

@pytest.mark.parametrize("cfg", [
    SCHEDULERS["dev"], SCHEDULERS["schnell"],
    {"use_dynamic_shifting": False, "shift": 3.0},                              # a fixed shift (SD3-style)
    {"use_dynamic_shifting": True, "base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 128,
     "max_image_seq_len": 2048},
])
def test_flow_schedule_matches_diffusers_scheduler(cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ours = FlowSchedule.from_config(cfg)
    c = sched.config
    for steps, seq in [(4, 16), (28, 4096), (7, 1000)]:
        mu = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(ours.timesteps(steps, seq), sched.sigmas, atol=1e-6, rtol=0)


def test_pipeline_takes_the_schedule_from_the_scheduler_config(tmp_path, repos, pipes):
    pipe = pipes["schnell-dynamic"]  # schnell-like (no guidance embedding) with dev's dynamic shifting
    assert pipe.variant == "schnell" and pipe.flow_schedule.dynamic and pipe.default_steps == 28
    torch.testing.assert_close(pipe.schedule(None, 64, 64), FlowSchedule().timesteps(28, 16))
    bare = tmp_path / "bare"  # no scheduler config: today's rule, by the guidance embedding
    shutil.copytree(repos["schnell-dynamic"], bare, ignore=shutil.ignore_patterns("scheduler"))
    p = Pipeline.load(bare, device="cpu")
    assert p.default_steps == 4 and torch.equal(p.schedule(None, 64, 64), torch.linspace(1, 0, 5))
    (bare / "scheduler").mkdir()
    (bare / "scheduler" / "scheduler_config.json").write_text(json.dumps({"use_karras_sigmas": True}))
    with pytest.raises(CheckpointError, match="unsupported scheduler option.*use_karras_sigmas"):
        Pipeline.load(bare, device="cpu")
    (bare / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Pipeline.load(bare, device="cpu")


def test_dynamic_schnell_default_steps_match_diffusers(repos, pipes):
    """The schnell-like model with a dev-like scheduler config, at the pipeline defaults (28 steps, no guidance)."""
    pipe = pipes["schnell-dynamic"]
    ours = pipe("a lighthouse", height=32, width=32, generator=gen(2), output_type="latent").images
    theirs = diffusers_pipe(repos["schnell-dynamic"])("a lighthouse", height=32, width=32, generator=gen(2),
                                                      max_sequence_length=256, output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- img2img

def _picture(w=48, h=64, seed=0):
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1.0, 0.5, 0.2]
    return Image.fromarray(np.clip(base + g.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("strength,steps,prompts,generators,negative,num_images", [
    (0.6, 5, "a watercolour fox", lambda: gen(4), None, 2),           # one generator: one posterior sample
    (0.5, 5, ["a fox", "a fox"], lambda: [gen(1), gen(2)], "", 1),   # a generator per image, true CFG
    (1.0, 3, "a fox", lambda: gen(0), None, 1),                       # strength 1: from pure noise
])
def test_img2img_matches_diffusers(repos, pipes, strength, steps, prompts, generators, negative, num_images):
    pic = _picture()
    cfg = dict(negative_prompt=negative, true_cfg_scale=2.0 if negative is not None else 1.0)
    ours = pipes["dev"].img2img(pic, prompts, strength=strength, steps=steps, seed=generators(),
                                num_images=num_images, return_latents=True, **cfg)
    image = [pic] * len(prompts) if isinstance(prompts, list) else pic  # diffusers: one image per generator
    theirs = diffusers_pipe(repos["dev"], "FluxImg2ImgPipeline")(
        prompt=prompts, image=image, height=64, width=48, strength=strength, num_inference_steps=steps,
        guidance_scale=3.5, generator=generators(), num_images_per_prompt=num_images, output_type="latent",
        max_sequence_length=512, **cfg).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_img2img_strength_and_size(pipes):
    pipe = pipes["dev"]
    pic = _picture(w=50, h=70)
    (out,) = pipe.img2img(pic, "x", steps=2)
    assert out.size == (48, 64)  # the image's size rounded down to multiples of 16
    low = pipe.img2img(pic, "x", strength=0.5, steps=4, return_latents=True)
    high = pipe.img2img(pic, "x", strength=1.0, steps=4, return_latents=True)
    start = pipe.encode_image(pil_to_tensor(pic.resize((48, 64), Image.LANCZOS)))
    assert (low - start).abs().mean() < (high - start).abs().mean()  # lower strength stays closer to the input
    with pytest.raises(ValueError, match=r"strength must lie in \[0.0, 1.0\]"):
        pipe.img2img(pic, "x", strength=1.5)
    with pytest.raises(ValueError, match="leaves no denoising step"):  # any strength > 0 keeps one step
        pipe.img2img(pic, "x", strength=0.0, steps=4)


# ---------------------------------------------------------------------------------------------- loaders

def test_loaders_share_defaults_and_accept_a_repository_root(repos, monkeypatch):
    root = repos["dev"]
    models = {f.__name__: f(root) for f in (load_transformer, load_autoencoder, load_t5, load_clip)}
    for name, m in models.items():  # one rule: fp32 on the CPU (t5/clip used to default to bf16)
        assert {(p.device.type, p.dtype) for p in m.parameters()} == {("cpu", torch.float32)}, name
    for f, own in ((load_t5, root / "text_encoder_2"), (load_clip, root / "text_encoder"),
                   (load_autoencoder, root / "vae"), (load_transformer, root / "transformer")):
        a, b = f(own).state_dict(), models[f.__name__].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f.__name__
    assert load_t5(root, dtype=torch.bfloat16).shared.weight.dtype == torch.bfloat16
    assert default_device_dtype() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device_dtype() == (torch.device("cuda"), torch.bfloat16)
    assert default_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert default_device_dtype("cuda", torch.float16) == (torch.device("cuda"), torch.float16)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_true_cfg_recorded_and_applied(tmp_path, repos, pipes):
    out = tmp_path / "c.png"
    main(["generate", "--prompt", "a cat", "--weights", str(repos["schnell-dynamic"]), "--height", "32",
          "--width", "32", "--steps", "2", "--seed", "4", "--negative-prompt", "", "--true-cfg", "3",
          "--output", str(out)])
    im = Image.open(out)
    assert im.text["negative_prompt"] == "" and im.text["true_cfg"] == "3.0" and im.text["steps"] == "2"
    (ref,) = pipes["schnell-dynamic"].generate("a cat", 32, 32, 2, seed=4, negative_prompt="", true_cfg_scale=3)
    assert np.array_equal(np.asarray(im), np.asarray(ref))


@pytest.mark.parametrize("argv,message", [
    (["generate", "--true-cfg", "2"], "--true-cfg > 1 needs --negative-prompt"),
    (["generate", "--negative-prompt", "dog"], "--negative-prompt has no effect unless --true-cfg > 1"),
    (["generate", "--true-cfg", "0.5", "--negative-prompt", ""], "--true-cfg"),   # (ranges: cli.check_inputs)
    (["img2img", "--image", "IMG", "--strength", "0"], "--strength"),
    (["img2img", "--image", "/nonexistent.png"], "/nonexistent.png"),
    (["img2img", "--image", "IMG", "--height", "50"], "--height"),
])
def test_cli_cfg_and_img2img_errors(tmp_path, argv, message):
    _picture().save(tmp_path / "in.png")
    argv = [str(tmp_path / "in.png") if a == "IMG" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--prompt", "x", "--weights", "/nonexistent/flux", "--output", str(tmp_path / "o.png")])
    assert message in str(e.value) and "weights" not in str(e.value)  # named before the weights are looked at


def test_cli_img2img(tmp_path, repos):
    _picture(w=48, h=32).save(tmp_path / "in.png")
    main(["img2img", "--image", str(tmp_path / "in.png"), "--prompt", "a watercolour", "--weights", str(repos["dev"]),
          "--strength", "0.5", "--steps", "2", "--output", str(tmp_path / "o.png")])
    im = Image.open(tmp_path / "o.png")
    assert im.size == (48, 32) and im.text["command"] == "img2img" and im.text["strength"] == "0.5"
    assert im.text["image"] == "in.png"  # the file's name, not where it is (issue 25 item 4)


def test_python_dash_m_minidit():
    r = subprocess.run([sys.executable, "-m", "minidit", "img2img", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--strength" in r.stdout and "--negative-prompt" in r.stdout, r.stderr
