"""The built-in trained tiny model, held to what it measurably does (weights/quality.py, quality_methods.py; numbers in
bench/RESULTS.md). Every threshold sits between the measured value and the value of a deliberately broken
variant, and each test also runs that broken variant and checks it fails — so these tests can fail.

Fixed seeds, CPU, fp32, a handful of evaluation scenes each (a few seconds per test)."""
import numpy as np
import pytest
import torch
from PIL import Image

from minidit.pipeline import Pipeline
from minidit.weights import quality as Q
from minidit.weights import quality_methods as M

N, STEPS = 12, 16   # scenes per measurement (inpainting: 6), sampling steps
# measured with these N/STEPS on the built-in model (the second tune, object-weighted; bench/RESULTS.md, "Tiny
# trained model"): text-to-image mean attribute accuracy 0.71, position 0.92 (chance 0.17, 0.20; the step-8312
# model with text zeroed: 0.17, 0.25); personalize, the prompt naming only the subject's shape, preset "official",
# 12.28 dB in the subject vs 8.77 plain (tokens 5 places off: 8.90); inpaint kept region 27.5 dB (τ = 1: 21.2);
# FreeCus reference colour 6/12 vs plain 2/12. Thresholds sit between the working and the broken values, and
# each test runs its broken variant. (The first tune: t2i 0.60 / 0.92, personalize with the full caption 11.79 vs
# 9.29, inpaint 28.6 vs 23.3 with τ = 1 — hence 26 rather than 20 —, FreeCus 5/12 vs 1/12.)
T2I_MEAN, T2I_POSITION = 0.25, 0.5
PA_PSNR, PA_GAIN = 9.8, 0.5
INPAINT_PSNR = 26.0
FREECUS_GAIN = 0.15
# issue 30's "no border frame or grid pattern", in 8-bit levels (quality.flat_errors, the worst palette colour):
# a grid-locked pattern up to 1 level (the measure's own floor from 8-bit rounding is ~0.5: a rounded 40-level ramp
# reads 0.47) and a frame up to 2 levels (the same ramp reads 2.3: the frame measure allows a smooth gradient).
# Measured on the shipped autoencoder: grid 1.58, frame 9.33 (and a colour offset of 27.6 levels).
AE_GRID, AE_FRAME = 1.0, 2.0


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(device="cpu")


def test_builtin_default_is_the_trained_model(pipe):
    assert "trained" in pipe.name and pipe.transformer.cfg.hidden_size == 128
    assert pipe.text.max_length == 48  # the T5 length it was trained with, read from tokenizer_2


def test_text_to_image_follows_the_prompt(pipe, monkeypatch):
    r = Q.t2i(pipe, n=N, steps=STEPS)
    assert r["mean"] >= T2I_MEAN and r["position"] >= T2I_POSITION, r
    # broken: the text is zeroed (T5 tokens and the pooled CLIP vector), so only the noise decides
    real = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: (lambda t, ids, v: (t * 0, ids, v * 0))(*real(p)))
    broken = Q.t2i(pipe, n=N, steps=STEPS)
    assert not (broken["mean"] >= T2I_MEAN and broken["position"] >= T2I_POSITION), broken


def test_personalize_copies_the_subject(pipe, monkeypatch):
    """The prompt names the subject by its shape and place only (as FreeCus's test does), so its colour and
    texture can come only from the reference; the released code's settings (preset "official": τ 0.5 on the
    shifted time, no perturbation). Measured on the built-in model, 12 scenes: 12.28 vs plain 8.77 dB; the paper's
    settings 10.19 vs 8.77; the broken variant 8.90 (official) / 8.43 (paper). With the full caption this
    model draws the subject's colour itself (plain 13.04 dB) and the method adds +0.17 dB (official) or loses
    1.9 dB (paper): bench/RESULTS.md."""
    r = M.personalize(pipe, n=N, steps=STEPS, preset="official", shape_only=True)
    assert r["psnr"] >= PA_PSNR and r["psnr"] - r["psnr_plain"] >= PA_GAIN, r
    # broken: the reference tokens replace the wrong target tokens (every destination 5 tokens further on)
    import dataclasses

    from minidit import personalize as P
    real = P.plan_regions
    monkeypatch.setattr(P, "plan_regions", lambda *a, **k: [dataclasses.replace(r, dst=(r.dst + 5) % 256)
                                                             for r in real(*a, **k)])
    broken = M.personalize(pipe, n=N, steps=STEPS, preset="official", shape_only=True)
    assert not (broken["psnr"] >= PA_PSNR and broken["psnr"] - broken["psnr_plain"] >= PA_GAIN), broken


def test_reconstruction_is_measured_against_the_references_round_trip(pipe, monkeypatch):
    """`psnr_trip` (the paper's Fig. 2 row in bench/quality.py) compares the subject region with the reference's own
    autoencoder round trip: a "method" that returns exactly that round trip reads the measure's cap there (148 dB,
    identical pixels), and in `psnr` what the autoencoder alone loses against the render in the subject region
    (14 dB on these textured subjects)."""
    def perfect(prompt, ref, **kw):
        return [Q.round_trip(pipe, ref.image)]
    monkeypatch.setattr(pipe, "personalize", perfect)
    monkeypatch.setattr(pipe, "generate", lambda prompt, **kw: [Image.new("RGB", (Q.SIZE, Q.SIZE))])
    r = M.personalize(pipe, n=2, steps=2)
    assert r["psnr_trip"] > 140.0 and r["psnr"] < 30.0, r


def test_the_methods_plain_baseline_runs_without_true_cfg(pipe, monkeypatch):
    """The methods have no true-CFG branch, so the plain generation they are compared with runs without it too,
    although the built-in model's own default (minidit.json) is true CFG 4: quality.cfg_kwargs turns it off."""
    calls, real = [], pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda prompt, **kw: calls.append(kw) or real(prompt, **kw))
    M.personalize(pipe, n=1, steps=1)
    M.freecus(pipe, n=1, steps=1, plain=True)
    assert len(calls) == 2 and pipe.with_defaults()[4] == 4.0
    assert all(pipe.with_defaults(true_cfg_scale=kw.get("true_cfg_scale"))[4] == 1.0 for kw in calls), calls


def test_inpaint_keeps_the_preserved_region(pipe):
    r = M.inpaint(pipe, n=6, steps=STEPS)
    assert r["psnr_kept"] >= INPAINT_PSNR, r
    # broken: τ = 1 replaces nothing, so nothing is preserved but what the model happens to redraw
    broken = M.inpaint(pipe, n=6, steps=STEPS, tau=1.0)
    assert broken["psnr_kept"] < INPAINT_PSNR, broken


def test_freecus_transfers_the_subject(pipe, monkeypatch):
    r = M.freecus(pipe, n=N, steps=STEPS, caption=False)
    plain = M.freecus(pipe, n=N, steps=STEPS, caption=False, plain=True)
    assert r["colour"] - plain["colour"] >= FREECUS_GAIN, (r, plain)
    # broken: attention sharing off (no vital layer: the reference never enters the target's attention; the
    # API refuses an empty list, so the check that would refuse it is bypassed)
    import minidit.freecus as fc
    monkeypatch.setattr(fc, "check_vital_layers", lambda layers, n: [])
    broken = M.freecus(pipe, n=N, steps=STEPS, caption=False)
    assert broken["colour"] - plain["colour"] < FREECUS_GAIN, (broken, plain)


def test_diffusers_reads_the_trained_repository_and_draws_the_same(pipe):
    """The trained files are a FLUX.1 repository in the official layouts: diffusers' FluxPipeline loads the
    folder (transformer/, vae/, text encoders, scheduler) and, with the same generator, draws the same image."""
    import diffusers
    from minidit.repository import builtin_repo
    theirs = diffusers.FluxPipeline.from_pretrained(builtin_repo(), dtype=torch.float32)
    theirs.set_progress_bar_config(disable=True)
    kw = dict(height=256, width=256, num_inference_steps=8, negative_prompt="", true_cfg_scale=4.0)
    prompt = "a large red striped star in the centre, on a blue background"
    a = theirs(prompt, generator=torch.Generator().manual_seed(3), max_sequence_length=48, output_type="pt", **kw).images
    b = pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="pt", **kw).images
    assert (a - b).abs().mean() <= 1 / 255 and b.std() > 0.05


def test_detectors_read_the_autoencoders_round_trips(pipe, monkeypatch):
    """The measuring instrument itself: renders through the model's autoencoder (what its training latents decode
    to) are read right, so a generation the detectors fail is the DiT's fault, not the decoder's faint border
    frame. Without `clean_mask` that frame stretches the bounding boxes and shapes read wrong."""
    from minidit.weights import world
    trips = [(s, Q.round_trip(pipe, world.render(s, Q.SIZE))) for s in Q.eval_scenes(16)]

    def accuracy(key):
        return sum(Q.attributes(im, s)[key] for s, im in trips) / len(trips)
    # measured on these 16 scenes: colour 0.62 (the tiny autoencoder blurs a texture's two colours together),
    # shape 0.94, position 0.94, background 0.94; shape without clean_mask 0.25
    got = {k: accuracy(k) for k in ("colour", "shape", "position", "background")}
    assert got["colour"] >= 0.5 and min(got["shape"], got["position"], got["background"]) >= 0.75, got
    monkeypatch.setattr(world, "clean_mask", lambda fg: fg)
    assert accuracy("shape") < 0.5


def test_text_locality_aligns_the_tokens_after_a_changed_word(pipe):
    """"red" is two T5 pieces and "green" one: compared at equal positions every later token would meet its
    neighbour (cosine 0.27 measured that way on the random-bias T5, ~0 on the local one); aligned from the end
    the built-in T5 keeps them (0.97; the random-bias T5 0.94)."""
    tok = pipe.text.t5_tokenizer
    assert len(tok.encode("red")) != len(tok.encode("green"))  # the case the alignment is for
    x = Q.text_locality(pipe)
    assert x["cosine_after"] > 0.8 and 0 < x["after"] < 0.6, x


def test_the_built_in_t5_sees_word_order(pipe):
    """Swapping the object's and the background's colours must change the T5 features the DiT sees as a set
    (quality.text_order): measured 0.57 with the local position bias the built-in T5 has, 0.23 with the random
    bias it replaced (then colours landed on the wrong region)."""
    assert Q.text_order(pipe) > 0.4


def flat_trip(grid: float = 0.0, period: int = 16, frame: float = 0.0, ramp: float = 0.0):
    """A fake round trip adding a vertical cosine (`grid` levels, `period` pixels), a `frame` of that many levels
    on the outermost 4 pixels and a top-to-bottom `ramp` (levels from the centre to the edge)."""
    def trip(image):
        a = np.asarray(image).astype(np.float64)
        x = np.arange(a.shape[1])
        a = a + grid * np.cos(2 * np.pi * x / period)[None, :, None] + ramp * (x[:, None, None] - 128) / 128
        a[:4], a[-4:], a[:, :4], a[:, -4:] = a[:4] + frame, a[-4:] + frame, a[:, :4] + frame, a[:, -4:] + frame
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    return trip


def test_flat_error_measures_tell_a_grid_and_a_frame_from_smooth_errors():
    """quality.flat_errors, the instrument of the next test: exact on a perfect round trip, reads a cosine on the
    token grid (period 16 or 8) at its amplitude and one off the grid (period 12) as little, a frame at its
    height, and a smooth gradient as neither."""
    check = lambda **kw: Q.flat_errors(flat_trip(**kw), colours=("blue", "orange"))  # noqa: E731
    assert check() == {"grid": 0.0, "frame": 0.0, "offset": 0.0}
    for period in (16, 8):
        assert abs(check(grid=3.0, period=period)["grid"] - 3.0) < 0.1
    assert check(grid=3.0, period=12)["grid"] < 0.5
    assert abs(check(frame=12.0)["frame"] - 12.0) < 0.6 and check(frame=12.0)["grid"] < 0.5
    smooth = check(ramp=40.0)
    assert smooth["grid"] < AE_GRID and smooth["frame"] < 2.5


@pytest.mark.xfail(strict=True, reason="issue 30: the shipped autoencoder (widths 32: each GroupNorm group one "
                   "channel) draws a frame (9.3 levels) and a grid (1.6); passes, and must then lose this mark, "
                   "once an autoencoder of weights/train_ae.AE's widths ships")
def test_autoencoder_draws_no_grid_or_frame_on_flat_colours(pipe):
    """The round trip of a flat image of each palette colour: its error has no component on the token grid above
    AE_GRID and no frame above AE_FRAME (quality.flat_errors, in levels; the instrument: the test above)."""
    r = Q.flat_errors(lambda image: Q.round_trip(pipe, image))
    assert r["grid"] <= AE_GRID and r["frame"] <= AE_FRAME, r
