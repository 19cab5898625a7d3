"""Personalize Anything on the tiny checkpoint: inversion round trip, token replacement at every block while
t > τ (and never after), layout, multi-subject, perturbation, inpainting/outpainting, errors, CLI."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from minidit import sampling
from minidit.cli import main
from minidit.masks import Reference, token_indices, token_mask, translate
from minidit.inversion import invert
from minidit.personalize import PersonalizeSettings, reconstruct, replace_steps, tau_threshold
from minidit.trajectory import ReferenceTrajectory
from minidit.regions import Region, plan_regions
from minidit.pipeline import Pipeline
from minidit.refstate import RefState
from minidit.weights.tiny import write_tiny_repo

H, W = 96, 128                 # 6 x 8 tokens
h, w = H // 16, W // 16


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(write_tiny_repo(tmp_path_factory.mktemp("pa") / "FLUX.1-dev", "dev", seed=3), device="cpu")


def picture(seed=0, height=H, width=W):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, height // 16, width // 16, generator=g) * 2 - 1      # smooth-ish, like an image
    return torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear")[0].clamp(-1, 1)


def box(x, y, bw, bh, height=H, width=W):
    m = torch.zeros(height, width)
    m[y:y + bh, x:x + bw] = 1
    return m


SUBJECT = box(16, 16, 48, 32)  # tokens rows 1-2, cols 1-3


def rows(q, idx):  # (B, H, N, D) -> image rows idx of every item
    return q[:, :, idx]


# ------------------------------------------------------------------------------------------------ τ and time

def test_tau_is_a_step_fraction_of_the_normalised_time():
    assert replace_steps(0.8, 28) == 6        # first 20 %: steps 0-5 (ceil(5.6))
    assert replace_steps(0.8, 5) == 1 and replace_steps(0.7, 10) == 3 and replace_steps(0.1, 28) == 26
    assert replace_steps(1.0, 28) == 0 and replace_steps(0.0, 28) == 28
    for tau, steps, seq in [(0.8, 28, 4096), (0.75, 10, 48), (0.1, 28, 1024), (0.33, 7, 256)]:
        ts = sampling.get_schedule(steps, seq, shift=True)
        thr = tau_threshold(tau, seq, shift=True)
        assert [i for i in range(steps) if ts[i] > thr] == list(range(replace_steps(tau, steps)))
        assert thr > tau  # the dev shift spends more time at high noise
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
            replace_steps(bad, 10)


# ------------------------------------------------------------------------------------------------ inversion

def test_inversion_round_trip(pipe):
    x = picture(1)
    inv = invert(pipe, x, "", steps=6, seed=4)
    y0 = pipe.encode_image(x[None])
    assert torch.equal(inv.latent, y0)
    # γ = 1: the controlled forward ODE lands exactly on its seeded noise sample
    assert (inv.noise - sampling.noise(1, H, W, 4)).abs().max() < 1e-5
    # η = 1 on every step: the reference branch re-traces its latent (measured max |Δ| ~1e-7)
    back = reconstruct(pipe, inv, eta=1.0, stop=1.0, return_latents=True)
    assert (back - y0).abs().max() < 1e-5
    # the authors' stop = 0.99 leaves the last step to the model: no longer exact with random weights
    free = reconstruct(pipe, inv, return_latents=True)
    assert (free - y0).abs().max() > 1e-3
    # plain Euler inversion + Euler sampling (γ = η = 0): first-order round trip, error shrinks with the steps
    errs = []
    for steps in (4, 16):
        inv0 = invert(pipe, x, "", steps=steps, gamma=0.0, guidance=3.5)
        back0 = reconstruct(pipe, inv0, eta=0.0, return_latents=True)
        errs.append((back0 - y0).abs().max().item())
    assert errs[1] < errs[0] / 2.5 and errs[1] < 0.6, errs   # measured 1.78 -> 0.50 (0.26 at 32, 0.067 at 128)


# ------------------------------------------------------------------------------------------------ replacement

def test_replacement_at_every_block_while_t_above_tau_and_never_after(pipe, monkeypatch):
    calls = []
    original = RefState.replace_tokens

    def spy(self, qkv, layer, offset=0):  # a hook on the one replacement entry
        out = original(self, qkv, layer, offset)
        calls.extend((self, offset, x, y) for x, y in zip(qkv, out))
        return out

    monkeypatch.setattr(RefState, "replace_tokens", spy)
    trace = []
    steps, tau = 5, 0.5                                          # replace on steps 0, 1, 2 (ceil(2.5))
    pipe.personalize("a toy on a table", Reference(picture(2), SUBJECT), placement=(32, 32), tau=tau,
                     perturb=False, steps=steps, seed=1, trace=trace, return_latents=True)
    n_layers = pipe.transformer.cfg.n_layers
    m = token_mask(SUBJECT)
    src = token_indices(m)
    dst = token_indices(translate(m, 2, 2))
    assert torch.equal(dst, src + 2 * w + 2)                     # translation moves exactly the masked tokens
    assert [s["replace"] for s in trace] == [True, True, True, False, False]
    assert [s["share"] for s in trace] == [False, False, False, True, True]
    assert all(s["n_ref"] == 1 for s in trace)
    outside = torch.ones(h * w, dtype=torch.bool)
    outside[dst] = False
    for s in trace:
        assert [rec[0] for rec in s["layers"]] == list(range(n_layers))  # every double and single block
        for layer, q, k, v in s["layers"]:
            for x in (q, k, v):
                same = torch.equal(rows(x[1:], dst), rows(x[:1], src))
                assert same == s["replace"], (s["step"], layer)
    # outside M nothing is touched, and the reference itself is never modified
    assert len(calls) == 3 * n_layers * 3                        # q, k, v x layers x replacement steps
    for state, offset, x_in, x_out in calls:
        img_in, img_out = x_in[:, :, offset:], x_out[:, :, offset:]
        assert torch.equal(x_out[:, :, :offset], x_in[:, :, :offset])        # text rows
        assert torch.equal(img_out[:1], img_in[:1])                          # the reference
        assert torch.equal(img_out[1:, :, outside], img_in[1:, :, outside])  # target outside M
        assert torch.equal(img_out[1:, :, dst], img_in[:1, :, src])          # target inside M


def test_tau_one_without_perturbation_or_concat_is_plain_generation(pipe):
    plain = pipe.generate("a red boat", height=H, width=W, steps=4, seed=7, return_latents=True)
    ours = pipe.personalize("a red boat", Reference(picture(3), SUBJECT), tau=1.0, perturb=False, concat=False,
                            steps=4, seed=7, return_latents=True)
    assert torch.equal(ours, plain)
    # the same with the reference branch kept in the batch the whole way: it does not leak into the target
    txt, txt_ids, vec = pipe.encode_prompt(["", "a red boat"])
    ts = pipe.schedule(4, H, W)
    inv = invert(pipe, picture(3), steps=4, seed=8)
    branch = ReferenceTrajectory(inv.noise, inv.latent, sampling.image_ids(1, H, W), txt[:1], txt_ids[:1], vec[:1],
                                 [Region(torch.arange(3), torch.arange(3))], 4, PersonalizeSettings(concat=False),
                                 n_replace=0, keep=True)
    out = sampling.denoise(pipe.transformer, sampling.noise(1, H, W, 7), sampling.image_ids(1, H, W), txt[1:],
                           txt_ids[1:], vec[1:], ts, 3.5, branch=branch)
    assert branch.n == 1 and (out - plain).abs().max() < 1e-5


def test_reference_costs_one_batch_item_while_it_is_used(pipe, monkeypatch):
    sizes = []
    forward = type(pipe.transformer).forward

    def counting(self, img, *a, **k):
        sizes.append(img.shape[0])
        return forward(self, img, *a, **k)

    monkeypatch.setattr(type(pipe.transformer), "forward", counting)
    refs = [Reference(picture(4), box(0, 0, 32, 32)), Reference(picture(5), box(96, 64, 32, 32))]
    pipe.personalize("two things", refs, tau=0.5, perturb=False, concat=False, steps=4, return_latents=True)
    assert sizes == [3, 3, 1, 1]                  # 2 references + 1 target while replacing, then the target alone
    sizes.clear()
    pipe.personalize("two things", refs, tau=0.5, perturb=False, concat=True, steps=4, num_images=2,
                     return_latents=True)
    assert sizes == [4, 4, 4, 4]                  # later-stage tokens: the references stay in the batch


def test_positions_and_concat_change_the_later_stage(pipe):
    ref = Reference(picture(6), SUBJECT)
    kw = dict(tau=0.5, perturb=False, steps=4, seed=2, return_latents=True)
    a = pipe.personalize("x", ref, positions="target", **kw)
    b = pipe.personalize("x", ref, positions="zero", **kw)
    c = pipe.personalize("x", ref, concat=False, **kw)
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="positions"):
        pipe.personalize("x", ref, positions="own", **kw)


# ------------------------------------------------------------------------------------------------ perturbation

def test_perturbation_is_seeded_and_used_by_the_replacement(pipe):
    ref = Reference(picture(7), box(16, 16, 64, 48))
    kw = dict(tau=0.6, steps=3, return_latents=True)
    a = pipe.personalize("x", ref, seed=3, **kw)
    assert torch.equal(a, pipe.personalize("x", ref, seed=3, **kw))
    assert (a - pipe.personalize("x", ref, seed=3, perturb=False, **kw)).abs().max() > 1e-4
    m = token_mask(ref.mask)
    reg = plan_regions([m], [(0, 0)], perturb=True, generator=torch.Generator().manual_seed(3))[0]
    assert reg.mask_op in ("dilate", "erode", "keep")
    assert torch.equal(torch.sort(reg.src).values, torch.sort(reg.dst).values)   # in place: same token set
    assert not torch.equal(reg.src, reg.dst)                                     # but shuffled
    trace = []
    pipe.personalize("x", ref, seed=3, trace=trace, **kw)
    for _, q, k, v in trace[0]["layers"]:
        assert torch.equal(rows(k[1:], reg.dst), rows(k[:1], reg.src))


# ------------------------------------------------------------------------------------------------ multi-subject

def test_multi_subject_each_region_gets_its_own_reference(pipe):
    m0, m1 = box(0, 0, 32, 32), box(32, 48, 48, 32)
    refs = [Reference(picture(8), m0), Reference(picture(9), m1, prompt="a cup")]
    trace = []
    pipe.personalize("a cup and a toy", refs, placement=[(64, 0), None], tau=0.7, perturb=False, steps=3,
                     trace=trace, return_latents=True)
    s0, s1 = token_indices(token_mask(m0)), token_indices(token_mask(m1))
    d0 = s0 + 4
    for _, q, k, v in trace[0]["layers"]:
        for x in (q, k, v):
            assert torch.equal(rows(x[2:], d0), rows(x[0:1], s0))
            assert torch.equal(rows(x[2:], s1), rows(x[1:2], s1))
            assert not torch.equal(rows(x[2:], d0), rows(x[1:2], s0))
    with pytest.raises(ValueError, match="overlap"):
        pipe.personalize("x", refs, placement=[(32, 48), None], steps=2, return_latents=True)


def test_scene_composition_fills_the_rest(pipe):
    subject = Reference(picture(10), SUBJECT)
    trace = []
    pipe.personalize("a toy in a garden", subject, scene=Reference(picture(11)), tau=0.6, perturb=False, steps=3,
                     trace=trace, return_latents=True)
    subj = token_indices(token_mask(SUBJECT))
    rest = torch.ones(h * w, dtype=torch.bool)
    rest[subj] = False
    rest = rest.nonzero().flatten()
    assert trace[0]["n_ref"] == 2
    for _, q, k, v in trace[0]["layers"]:
        assert torch.equal(rows(v[2:], subj), rows(v[0:1], subj))
        assert torch.equal(rows(v[2:], rest), rows(v[1:2], rest))


# ------------------------------------------------------------------------------------------------ editing

def on_reference_path(step, y0, eps):  # γ = η = 1: the reference trajectory is (1 - t)·y0 + t·ε exactly
    return (1 - step["t"]) * y0 + step["t"] * eps


def test_inpainting_keeps_the_unmasked_region_on_the_reference_trajectory(pipe):
    x = picture(12)
    edit = box(32, 16, 48, 48)
    trace = []
    steps = 10
    out = pipe.inpaint(x, edit, "a castle", steps=steps, seed=5, trace=trace, return_latents=True)
    keep = token_indices(token_mask(1 - edit, threshold=1.0))
    hole = token_indices(token_mask(edit, threshold=1e-6))
    y0, eps = pipe.encode_image(x[None]), sampling.noise(1, H, W, 6)   # reference 0 is inverted with seed + 1
    n_rep = replace_steps(0.1, steps)
    assert n_rep == 9 and [s["replace"] for s in trace[:n_rep]] == [True] * n_rep
    for s in trace[:n_rep + 1]:                  # the inputs of every replacement step and the grid point after
        path = on_reference_path(s, y0, eps)
        tgt = s["x"][-1:]
        assert (tgt[:, keep] - path[:, keep]).abs().max() < 1e-5, s["step"]
        assert (tgt[:, hole] - path[:, hole]).abs().max() > 1e-2
        if s["n_ref"]:
            assert (s["x"][:1] - path).abs().max() < 1e-5
    assert trace[-1]["n_ref"] == 0               # the last 10 %: the target alone harmonises
    assert out.shape == (1, h * w, 64)
    with pytest.raises(ValueError, match="edit mask is empty"):
        pipe.inpaint(x, torch.zeros(H, W), "x", steps=2)
    with pytest.raises(ValueError, match="nothing is preserved"):
        pipe.inpaint(x, torch.ones(H, W), "x", steps=2)
    with pytest.raises(ValueError, match="edit mask: mask size 96x144 .* differs from the image size 96x128"):
        pipe.inpaint(x, torch.zeros(H, W + 16), "x", steps=2)


def test_outpainting_keeps_the_original_area(pipe):
    x = picture(13, 64, 64)
    trace = []
    out = pipe.outpaint(x, "a wide valley", canvas=(W, H), offset=(32, 16), tau=0.0, stop=1.0, steps=4, seed=2,
                        trace=trace, return_latents=True)
    canvas = torch.full((3, H, W), -1.0)
    canvas[:, 16:80, 32:96] = x
    y0 = pipe.encode_image(canvas[None])
    area = token_indices(token_mask(box(32, 16, 64, 64), threshold=1.0))
    assert area.numel() == 16
    for s in trace:
        assert (s["x"][-1:, area] - on_reference_path(s, y0, sampling.noise(1, H, W, 3))[:, area]).abs().max() < 1e-5
    assert (out[:, area] - y0[:, area]).abs().max() < 1e-5     # τ = 0, η = 1 to the end: the area is the original
    rest = torch.ones(h * w, dtype=torch.bool)
    rest[area] = False
    assert (out[:, rest] - y0[:, rest]).abs().max() > 1e-2
    images = pipe.outpaint(x, "a wide valley", canvas=(W, H), steps=2)  # default: centred, τ = 0.1
    assert images[0].size == (W, H)
    with pytest.raises(ValueError, match="does not fit"):
        pipe.outpaint(x, "x", canvas=(W, H), offset=(96, 0), steps=2)


# ------------------------------------------------------------------------------------------------ errors

def test_bad_inputs_have_clear_errors(pipe):
    x = picture(14)
    kw = dict(steps=2, return_latents=True)
    with pytest.raises(ValueError, match="reference 0's mask: mask size 112x128 .* differs from the image size"):
        pipe.personalize("x", Reference(x, torch.ones(H + 16, W)), **kw)
    with pytest.raises(ValueError, match="not a multiple of 16"):
        pipe.personalize("x", Reference(picture(0, 96, 120)), **kw)
    with pytest.raises(FileNotFoundError):
        pipe.personalize("x", Reference("/nonexistent/ref.png"), **kw)
    with pytest.raises(ValueError, match="empty"):
        pipe.personalize("x", Reference(x, torch.zeros(H, W)), **kw)
    with pytest.raises(ValueError, match="outside"):
        pipe.personalize("x", Reference(x, (100, 0, 64, 32)), **kw)           # box mask off the canvas
    with pytest.raises(ValueError, match="outside"):
        pipe.personalize("x", Reference(x, SUBJECT), placement=(96, 0), **kw)  # subject moved off the canvas
    with pytest.raises(ValueError, match="outside"):
        pipe.personalize("x", Reference(x, SUBJECT), placement=(0, 64, 64, 64), **kw)  # target box off the canvas
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.personalize("x", Reference(x, SUBJECT), placement=(8, 0), **kw)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        pipe.personalize("x", Reference(x, SUBJECT), tau=1.2, **kw)
    with pytest.raises(ValueError, match="one placement per reference"):
        pipe.personalize("x", [Reference(x, SUBJECT), Reference(x, SUBJECT)], placement=(16, 0), **kw)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_personalize_inpaint_outpaint(pipe, tmp_path):
    root = pipe.name
    def to_png(t):
        return Image.fromarray(((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))

    to_png(picture(15)).save(tmp_path / "ref.png")
    to_png(picture(16)).save(tmp_path / "ref2.png")
    Image.fromarray((SUBJECT.numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    common = ["--weights", root, "--steps", "2", "--seed", "1"]
    out = tmp_path / "p.png"
    main(["personalize", "--prompt", "a toy", "--ref", str(tmp_path / "ref.png"), "--mask", str(tmp_path / "mask.png"),
          "--ref", str(tmp_path / "ref2.png"), "--mask", "0,64,32,32", "--box", "64,0,64,64", "--box", "0,64,32,32",
          "--tau", "0.5", "--output", str(out), *common])
    im = Image.open(out)
    assert im.size == (W, H) and im.text["command"] == "personalize" and im.text["tau"] == "0.5"
    assert im.text["perturb"] == "True" and "64, 0, 64, 64" in im.text["placement"]
    main(["inpaint", "--prompt", "a castle", "--image", str(tmp_path / "ref.png"), "--mask", "32,16,48,48",
          "--output", str(tmp_path / "i.png"), *common])
    assert Image.open(tmp_path / "i.png").text["command"] == "inpaint"
    main(["outpaint", "--prompt", "a valley", "--image", str(tmp_path / "ref.png"), "--canvas", "160x128",
          "--output", str(tmp_path / "o.png"), *common])
    assert Image.open(tmp_path / "o.png").size == (160, 128)
    with pytest.raises(SystemExit, match="once per --ref"):
        main(["personalize", "--prompt", "x", "--ref", str(tmp_path / "ref.png"), "--ref", str(tmp_path / "ref2.png"),
              "--mask", str(tmp_path / "mask.png"), *common])
    with pytest.raises(SystemExit, match="overlap"):
        main(["personalize", "--prompt", "x", "--ref", str(tmp_path / "ref.png"), "--ref", str(tmp_path / "ref2.png"),
              "--mask", str(tmp_path / "mask.png"), "--mask", str(tmp_path / "mask.png"), "--no-perturb", *common])
    with pytest.raises(SystemExit, match="tau"):
        main(["inpaint", "--prompt", "x", "--image", str(tmp_path / "ref.png"), "--mask", "0,0,16,16", "--tau", "2",
              *common])


def test_bench_script_runs():
    r = subprocess.run([sys.executable, "bench/personalize.py", "--size", "64", "--steps", "2", "--repeats", "1",
                        "--txt-len", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| loop, 2 refs, τ=0.8, concat |" in r.stdout and "ratio" in r.stdout
