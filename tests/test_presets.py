"""`preset="paper" | "official"` for Personalize Anything (personalize, inpaint, outpaint) and FreeCus.

Each "official" rule is checked against its defining number computed here independently (replace-step counts,
the released inversion's closed form, the centre-pixel token set, the released μ), the paper-side options
(blend, mu_shift_type, η decay, inversion guidance/prompt) are checked for what they do, and every entry point
is compared with an independent re-implementation of the authors' released algorithm
(tests/released_reference.py) on the tiny model: ≤ 1e-3 max latent difference, ≤ 1/255 mean pixel difference.
Both presets run through every entry point and the CLI; overriding one field changes exactly that field."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import released_reference as rr
from minidit import sampling
from minidit.cli import main
from minidit.freecus import FreeCusSettings, reference_sigmas, released_ans_seq_len
from minidit.masks import Reference, token_indices, token_mask, token_mask_bilinear, token_mask_center
from minidit.inversion import invert_latent
from minidit.personalize import EditSettings, PersonalizeSettings, replace_steps_shifted
from minidit.regions import keep_tokens, outpaint_canvas
from minidit.pipeline import Pipeline
from minidit.presets import PRESET
from minidit.weights.tiny import write_tiny_repo

H, W = 96, 128                 # 6 x 8 tokens
h, w = H // 16, W // 16
N = h * w


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_tiny_repo(tmp_path_factory.mktemp("presets") / "FLUX.1-dev", "dev", seed=5)


@pytest.fixture(scope="module")
def pipe(repo):
    return Pipeline.load(repo, device="cpu")


def picture(seed=0, height=H, width=W):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, height // 16, width // 16, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear")[0].clamp(-1, 1)
    return ((x + 1) * 127.5).round() / 127.5 - 1          # exactly representable as 8-bit pixels


def to_pil(x):
    return Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())


def ellipse(cy, cx, ry, rx, height=H, width=W):
    """An off-grid ellipse (float centre and radii), 1 inside."""
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()


def shifted_sigmas(steps, seq):
    """FLUX.1-dev's schedule written out: σ_i = e^μ / (e^μ + 1/s_i - 1), s_i = 1 - i/steps, μ linear in seq."""
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    return [math.exp(mu) / (math.exp(mu) + (1 / (1 - i / steps) - 1)) for i in range(steps)] + [0.0]


# ------------------------------------------------------------------------------------------- τ

@pytest.mark.parametrize("tau_pct,size,steps", [(80, 1024, 28), (80, 512, 28), (50, 1024, 28), (50, 512, 28),
                                                (30, 768, 20), (95, 256, 12), (50, 128, 6), (0, 512, 10),
                                                (100, 512, 10)])
def test_official_tau_counts_shifted_steps(tau_pct, size, steps):
    seq = (size // 16) ** 2
    expected = sum(1 for s in shifted_sigmas(steps, seq)[:-1] if s > tau_pct / 100)
    timesteps = sampling.get_schedule(steps, seq)
    got = PersonalizeSettings.resolve("official", tau=tau_pct).replace_steps(timesteps)
    assert got == expected
    assert EditSettings.resolve("official", tau=tau_pct).replace_steps(timesteps) == expected
    # the same against the diffusers scheduler the released pipeline uses, compared as its processor does
    ts, _ = rr.set_schedule(rr.flux_scheduler(), steps, seq)
    assert sum(1 for t in ts if t.to(torch.float32).item() / 1000 > tau_pct / 100) == expected
    # the paper's step fraction: ceil((1 - τ)·n)
    paper = PersonalizeSettings.resolve("paper", tau=tau_pct / 100).replace_steps(timesteps)
    assert paper == math.ceil((1 - tau_pct / 100) * steps - 1e-9)


def test_issue_numbers_and_units():
    t1024, t512 = sampling.get_schedule(28, 4096), sampling.get_schedule(28, 1024)
    assert replace_steps_shifted(0.8, t1024) == 13 and replace_steps_shifted(0.8, t512) == 9
    assert replace_steps_shifted(0.5, t1024) == 22 and replace_steps_shifted(0.5, t512) == 19
    s = PersonalizeSettings.official()
    assert (s.tau, s.tau_units, s.tau_time, s.tau_value) == (50.0, "percent", "shifted", 0.5)
    assert PersonalizeSettings.resolve("official", tau=0.5, tau_units="fraction").replace_steps(t1024) == 22
    with pytest.raises(ValueError, match=r"tau must be in \[0, 100\]"):
        PersonalizeSettings.resolve("official", tau=150)
    with pytest.raises(ValueError, match=r"tau must be in \[0, 1\]"):
        PersonalizeSettings.resolve("paper", tau=50)
    with pytest.warns(UserWarning, match="did you mean tau_units='fraction'"):
        PersonalizeSettings.resolve("official", tau=0.8)


# ------------------------------------------------------------------------------------------- inversion

def test_released_inversion_closed_form():
    """γ = 1 on the released grid: Y_{i+1} = Y_i + d_i (ε - Y_i)/(1 - i/(n+1)), so Y_n = c·y0 + (1 - c)·ε."""
    n, seq = 28, 64                                                    # 128² px on FLUX.1-dev
    _, sig = rr.set_schedule(rr.flux_scheduler(), n, seq)
    c = 1.0
    for i in range(n):
        c *= 1 - float(sig[i] - sig[i + 1]) / (1 - i / (n + 1))
    assert c == pytest.approx(0.0062, abs=1e-4)                        # the issue's 0.0062·y0 + 0.9938·ε
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.randn(1, seq, 64, generator=g), torch.randn(1, seq, 64, generator=g)
    ts = sampling.get_schedule(n, seq)
    released = invert_latent(None, y0, None, None, None, None, ts, eps, gamma=1.0, grid="released")
    torch.testing.assert_close(released, c * y0 + (1 - c) * eps, atol=2e-5, rtol=0)
    ours = invert_latent(None, y0, None, None, None, None, ts, eps, gamma=1.0, grid="sampler")
    torch.testing.assert_close(ours, eps, atol=2e-5, rtol=0)           # minidit's grid lands exactly on ε


class Recorder:
    def __init__(self, model):
        self.model, self.cfg, self.calls = model, model.cfg, []

    def __call__(self, img, img_ids, txt, txt_ids, t, y, g=None, ref=None):
        self.calls.append((float(t[0]), None if g is None else float(g[0])))
        return self.model(img, img_ids, txt, txt_ids, t, y, g, ref=ref)


def test_released_inversion_feeds_i_over_n_plus_1_and_its_guidance(pipe):
    n = 5
    ts = pipe.schedule(n, H, W)
    y0 = pipe.encode_image(picture(1)[None])
    eps = sampling.noise(1, H, W, 3)
    txt, txt_ids, vec = pipe.encode_prompt(["a toy"])
    ids = sampling.image_ids(1, H, W)
    rec = Recorder(pipe.transformer)
    ours = invert_latent(rec, y0, ids, txt, txt_ids, vec, ts, eps, gamma=0.5, guidance=2.0, grid="released")
    assert [t for t, _ in rec.calls] == pytest.approx([i / (n + 1) for i in range(n)], abs=1e-7)
    assert all(g == 2.0 for _, g in rec.calls)
    ref = rr.released_invert(pipe.transformer, y0, eps, rr.set_schedule(rr.flux_scheduler(), n, N), txt, txt_ids,
                             vec, ids, gamma=0.5, source_guidance=2.0)
    assert (ours - ref).abs().max() < 1e-4


def test_personalize_inversion_prompt_and_guidance_are_settings(pipe, monkeypatch):
    seen, real = [], pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: (seen.append(list(p)), real(p))[1])
    ref = Reference(picture(2), ellipse(40, 60, 20, 30), prompt="a toy")
    kw = dict(steps=2, return_latents=True, perturb=False)
    pipe.personalize("x", ref, gamma=0.5, **kw)
    assert seen[0] == ["a toy"]                                        # paper: the reference's own prompt
    seen.clear()
    pipe.personalize("x", ref, gamma=0.5, invert_prompt="a photo", **kw)
    assert seen[0] == ["a photo"]
    seen.clear()
    pipe.personalize("x", ref, preset="official", gamma=0.5, vae_sample=False, **kw)
    assert seen[0] == [""]                                             # official: source_prompt=""
    a = pipe.personalize("x", ref, gamma=0.5, invert_guidance=0.0, **kw)
    b = pipe.personalize("x", ref, gamma=0.5, invert_guidance=4.0, **kw)
    assert (a - b).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------- masks

def test_center_rule_on_an_off_grid_ellipse():
    m = ellipse(45.3, 61.7, 27.9, 41.2)
    u8 = (m * 255).to(torch.uint8).numpy()
    expected = rr.create_mask(u8, w, h).bool()                          # PIL NEAREST + == 255, as released
    got = token_mask_center(m)
    assert torch.equal(got, expected)
    by_hand = torch.tensor([[bool(u8[16 * r + 8, 16 * c + 8] == 255) for c in range(w)] for r in range(h)])
    assert torch.equal(got, by_hand)
    assert not torch.equal(got, token_mask(m))                          # the area rule differs on this ellipse
    # editing: the preserved tokens of an edit mask are those whose centre pixel is not repainted
    edit = m
    keep = keep_tokens(1 - edit, "center")
    assert torch.equal(keep, rr.create_mask(((1 - edit) * 255).to(torch.uint8).numpy(), w, h).bool())
    assert not torch.equal(keep, keep_tokens(1 - edit, "area"))
    # FreeCus: bilinear to the token grid (the 2x2 centre pixels), > 0
    fc = token_mask_bilinear(m)
    assert torch.equal(token_indices(fc), rr.freecus_indices(m, H, W))
    by_hand = torch.tensor([[bool(m[16 * r + 7:16 * r + 9, 16 * c + 7:16 * c + 9].max() > 0) for c in range(w)]
                            for r in range(h)])
    assert torch.equal(fc, by_hand)


def test_official_inpaint_uses_the_center_rule(pipe):
    edit = ellipse(45.3, 61.7, 27.9, 41.2)
    trace = []
    pipe.inpaint(picture(3), edit, "a castle", preset="official", vae_sample=False, steps=3, trace=trace,
                 return_latents=True)
    keep = token_indices(rr.create_mask(((1 - edit) * 255).to(torch.uint8).numpy(), w, h).bool())
    rec = trace[0]["layers"]
    assert trace[0]["replace"] and rec
    _, q, k, v = rec[0]
    assert torch.equal(q[1:, :, keep], q[:1, :, keep])


def test_outpaint_canvas_clip_matches_the_demo():
    x = picture(4, 48, 64)
    pil = to_pil(x)
    for ox, oy in [(24, 8), (-20, 40), (90, -10)]:                      # off-grid, and partly off the canvas
        canvas, area = outpaint_canvas(x, (W, H), (ox, oy), paste="clip")
        bg, mask = rr.outpainting_canvas(pil, ox, oy, W, H)
        assert np.array_equal(np.asarray(to_pil(canvas)), np.asarray(bg))
        assert np.array_equal((area.numpy() * 255).astype(np.uint8), mask)
    with pytest.raises(ValueError, match="does not fit"):
        outpaint_canvas(x, (W, H), (90, -10), paste="fit")
    with pytest.raises(ValueError, match="entirely off"):
        outpaint_canvas(x, (W, H), (200, 0), paste="clip")


# ------------------------------------------------------------------------------------------- FreeCus μ

@pytest.mark.parametrize("size,seq,mu", [(128, 1, 0.4568), (512, 16, 0.4594), (1024, 64, 0.4675)])
def test_released_mu_from_the_latent_size(size, seq, mu):
    assert released_ans_seq_len(size, size) == seq == rr.released_seq_len(size, size)
    expected = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    assert expected == pytest.approx(mu, abs=1e-4)
    assert FreeCusSettings.official().mu(size, size) == pytest.approx(expected, abs=1e-12)
    tokens = (size // 16) ** 2
    assert FreeCusSettings.paper().mu(size, size) == pytest.approx(0.5 + 0.65 * (tokens - 256) / 3840, abs=1e-12)
    # the σ' of the released code at this size: diffusers' scheduler with mu = -μ_latent
    sched = rr.flux_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 30, 30), mu=-expected)
    torch.testing.assert_close(reference_sigmas(30, tokens, mu=FreeCusSettings.official().mu(size, size)),
                               sched.sigmas[:-1].float(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("shift_type", ["negative", "half_negative", "twice_negative", "normal", "linear"])
def test_mu_shift_types_equal_flux_utils(shift_type):
    n, size = 30, 512
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    mu = FreeCusSettings.official().mu(size, size)
    ours = reference_sigmas(n, 1024, mu=mu, shift_type=shift_type)
    if shift_type == "linear":  # flux_utils: floor(1000·σ) looked up in a 1000-step table of t/1000
        sig = torch.from_numpy(np.linspace(1.0, 1 / n, n)).to(torch.float32)
        table = torch.from_numpy(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1].copy()) / 1000
        idx = [int(np.where(np.linspace(1, 1000, 1000, dtype=np.float32)[::-1] == t)[0][0])
               for t in (sig * 1000).floor().tolist()]
        torch.testing.assert_close(ours, table[idx], atol=0, rtol=0)
        assert ours[1] == pytest.approx(0.966)
    else:
        zs = rr.noised_references(x, eps, n, size, size, shift_type)
        for i in (1, n // 2, n - 1):
            z = (1 - ours[i]) * x + ours[i] * eps
            torch.testing.assert_close(z, zs[i], atol=2e-6, rtol=0)
    if shift_type == "normal":
        assert (ours[1:] > reference_sigmas(n, 1024, mu=mu)[1:]).all()


def test_official_lambda_ref_is_fixed():
    s = FreeCusSettings.resolve("official", lambda_prompt=1.3)
    assert (s.lambda_ref, s.lambda_prompt) == (1.1, 1.3)
    assert s.diff(FreeCusSettings.official()) == {"lambda_prompt": (1.3, 1.1)}


# ------------------------------------------------------------------------------------------- settings

def test_settings_resolution_and_overrides():
    for cls in (PersonalizeSettings, EditSettings, FreeCusSettings):
        assert cls.resolve() == cls.paper() == cls()
        assert cls.resolve("official") == cls.official()
        assert cls.resolve(cls.official()) == cls.official()
        off = cls.official()
        field = "vae_seed"
        one = cls.resolve("official", **{field: 7})
        assert one.diff(off) == {field: (7, None)}
        assert cls.resolve("official", **{field: PRESET}) == off
        assert json.loads(json.dumps(off.asdict())) == off.asdict()
        with pytest.raises(ValueError, match="preset must be one of"):
            cls.resolve("released")
        with pytest.raises(TypeError, match="no field"):
            cls.resolve("paper", nonsense=1)
    assert EditSettings.parse(["blend=true", "tau=30", "vae_seed=none", "invert_prompt=a cat"]) == \
        dict(blend=True, tau=30.0, vae_seed=None, invert_prompt="a cat")
    assert FreeCusSettings.parse(["vital_layers=0,3"]) == dict(vital_layers=(0, 3))
    with pytest.raises(ValueError, match="expected bool"):
        EditSettings.parse(["blend=maybe"])


def test_blend_keeps_the_preserved_latents(pipe):
    x = picture(5)
    edit = torch.zeros(H, W)
    edit[16:80, 32:96] = 1
    y0 = pipe.encode_image(x[None])
    keep = token_indices(keep_tokens(1 - edit, "area"))
    kw = dict(steps=6, seed=2, return_latents=True, stop=1.0, tau=0.0)  # replace on every step, η = 1 to the end
    on = pipe.inpaint(x, edit, "a castle", **kw)
    off = pipe.inpaint(x, edit, "a castle", blend=False, **kw)
    assert (on[:, keep] - y0[:, keep]).abs().max() < 1e-4            # blend: the preserved region is the image
    assert (off[:, keep] - y0[:, keep]).abs().max() > 1e-2           # no blend: it is not (random tiny model)


def test_eta_decay(pipe):
    ref = Reference(picture(6), ellipse(40, 60, 20, 30))
    kw = dict(steps=4, seed=1, perturb=False, return_latents=True, tau=0.5)
    trace_a, trace_b = [], []
    a = pipe.personalize("x", ref, trace=trace_a, **kw)
    b = pipe.personalize("x", ref, decay_eta=True, eta_decay_power=2.0, trace=trace_b, **kw)
    assert torch.equal(trace_a[0]["x"], trace_b[0]["x"])             # same start; step 0 has (1 - 0)^2 = 1
    assert torch.equal(trace_a[1]["x"], trace_b[1]["x"])
    assert not torch.equal(trace_a[2]["x"][:1], trace_b[2]["x"][:1])  # step 1's η = (3/4)^2: the reference moves
    assert (a - b).abs().max() > 0


# ------------------------------------------------------------------------------------------- both presets, every entry

@pytest.mark.parametrize("preset", ["paper", "official"])
def test_both_presets_through_every_entry_point(pipe, preset):
    ref = Reference(picture(7), ellipse(40, 60, 22, 30))
    kw = dict(steps=2, preset=preset)
    assert pipe.personalize("a toy", ref, placement=(16, 0), **kw)[0].size == (W, H)
    assert pipe.inpaint(picture(8), ellipse(45, 60, 25, 35), "a castle", **kw)[0].size == (W, H)
    offset = (24, 8) if preset == "official" else (32, 16)            # off-grid only with paste="clip"
    assert pipe.outpaint(picture(9, 64, 80), "a valley", canvas=(W, H), offset=offset, **kw)[0].size == (W, H)
    assert pipe.freecus("a dog", ref, **kw)[0].size == (W, H)
    if preset == "official":  # their concept tokens switched on: every step, every item, references too
        trace = []
        pipe.personalize("a toy", ref, concat=True, steps=3, preset=preset, trace=trace, return_latents=True)
        assert all(s["share"] and s["n_ref"] == 1 for s in trace)


# ------------------------------------------------------------------------------------------- the released code

def _mean_pixel(pipe, a, b, height, width):
    x = np.asarray(pipe.decode(a, height, width)[0], dtype=np.float64)
    y = np.asarray(pipe.decode(b, height, width)[0], dtype=np.float64)
    return np.abs(x - y).mean() / 255


def _pa_reference(pipe, images, prompts, prompt, masks, shift_masks, tau, steps, seed, concept=False):
    """gradio_demo.py / notebooks: invert every reference (source_prompt "", γ = 1), then
    pipe([ref prompts..., prompt], inverted_latents, start 0, stop 0.99, eta 1)."""
    model = pipe.transformer
    y0 = pipe.encode_image(torch.stack(images))                      # the posterior mean, as the issue fixes it
    ids = sampling.image_ids(1, H, W)
    e_txt, e_ids, e_vec = pipe.encode_prompt([""])
    inverted = torch.cat([rr.released_invert(model, y0[r:r + 1], sampling.noise(1, H, W, seed + 1 + r),
                                             rr.set_schedule(rr.flux_scheduler(), steps, N), e_txt, e_ids, e_vec,
                                             ids) for r in range(len(images))])
    txt, txt_ids, vec = pipe.encode_prompt(prompts + [prompt])
    proc = rr.PersonalizeAnythingProcessor(masks, shift_masks, tau / 100, concept_process=concept)
    return rr.released_generate(model, rr.flux_scheduler(), steps, N, inverted, y0, sampling.noise(1, H, W, seed),
                                txt, txt_ids, vec, ids.expand(len(images) + 1, -1, -1), proc)


@pytest.mark.parametrize("concept", [False, True])
def test_official_personalize_reproduces_the_released_code(pipe, concept):
    x = picture(10)
    subject = ellipse(45.3, 50.7, 25.9, 30.2)
    u8 = (subject * 255).to(torch.uint8).numpy()
    mask = rr.create_mask(u8, w, h)
    shift = 2
    steps, tau, seed = 6, 60, 3
    ours = pipe.personalize("a toy on the beach", Reference(x, subject), placement=(16 * shift, 0),
                            preset="official", tau=tau, concat=concept, vae_sample=False, steps=steps, seed=seed,
                            return_latents=True)
    ref = _pa_reference(pipe, [x], [""], "a toy on the beach", [mask], [rr.shift_tensor(mask, shift)], tau, steps,
                        seed, concept)
    assert PersonalizeSettings.resolve("official", tau=tau).replace_steps(pipe.schedule(steps, H, W)) not in (0, steps)
    assert (ours - ref).abs().max() < 1e-3
    assert _mean_pixel(pipe, ours, ref, H, W) <= 1 / 255
    paper = pipe.personalize("a toy on the beach", Reference(x, subject), placement=(16 * shift, 0), steps=steps,
                             seed=seed, return_latents=True)
    assert (paper - ref).abs().max() > 1e-2                          # and "paper" is a different method


def test_official_multi_subject_reproduces_the_released_code(pipe):
    xs = [picture(11), picture(12)]
    subjects = [ellipse(30.5, 30.5, 20, 22), ellipse(70.2, 100.1, 18, 20)]
    masks = [rr.create_mask((m * 255).to(torch.uint8).numpy(), w, h) for m in subjects]
    steps, tau, seed = 5, 50, 4
    ours = pipe.personalize("two toys", [Reference(xs[0], subjects[0]), Reference(xs[1], subjects[1])],
                            preset="official", vae_sample=False, steps=steps, seed=seed, return_latents=True)
    ref = _pa_reference(pipe, xs, ["", ""], "two toys", masks, masks, tau, steps, seed)
    assert (ours - ref).abs().max() < 1e-3
    assert _mean_pixel(pipe, ours, ref, H, W) <= 1 / 255


def test_official_inpaint_reproduces_the_released_demo(pipe):
    x = picture(13)
    edit = ellipse(45.3, 61.7, 27.9, 41.2)
    steps, seed = 6, 2
    ours = pipe.inpaint(x, edit, "a castle", preset="official", vae_sample=False, steps=steps, seed=seed,
                        return_latents=True)
    keep = rr.create_mask(((1 - edit) * 255).to(torch.uint8).numpy(), w, h)     # mask.png: 255 = not painted
    ref = _pa_reference(pipe, [x], [""], "a castle", [keep], [keep], 50, steps, seed)
    assert (ours - ref).abs().max() < 1e-3
    assert _mean_pixel(pipe, ours, ref, H, W) <= 1 / 255
    blended = pipe.inpaint(x, edit, "a castle", steps=steps, seed=seed, return_latents=True)   # paper: blend
    assert _mean_pixel(pipe, blended, ref, H, W) > 2 / 255


def test_official_outpaint_reproduces_the_released_demo(pipe):
    small = picture(14, 64, 80)
    pil = to_pil(small)
    ox, oy = 24, 40                                                  # off-grid and partly below the canvas
    steps, seed = 6, 1
    ours = pipe.outpaint(pil, "a wide valley", canvas=(W, H), offset=(ox, oy), preset="official",
                         vae_sample=False, steps=steps, seed=seed, return_latents=True)
    bg, mask_u8 = rr.outpainting_canvas(pil, ox, oy, W, H)
    from minidit.image import pil_to_tensor
    keep = rr.create_mask(mask_u8, w, h)
    ref = _pa_reference(pipe, [pil_to_tensor(bg)[0]], [""], "a wide valley", [keep], [keep], 50, steps, seed)
    assert (ours - ref).abs().max() < 1e-3
    assert _mean_pixel(pipe, ours, ref, H, W) <= 1 / 255


@pytest.mark.parametrize("shift_type", ["negative", "linear"])
def test_official_freecus_reproduces_the_released_code(pipe, shift_type):
    x = picture(15)
    subject = ellipse(45.3, 61.7, 27.9, 41.2)
    steps, seed, vital = 5, 777, [0, 3]
    prompt = "a dog surfing. brown fur"
    ours = pipe.freecus("a dog surfing", Reference(x, subject), caption="brown fur", preset="official",
                        vae_sample=False, vital_layers=vital, lambda_prompt=1.2, mu_shift_type=shift_type,
                        steps=steps, seed=seed, return_latents=True)
    model = pipe.transformer
    x_ref = pipe.encode_image(x[None])
    noise = sampling.noise(1, H, W, seed)
    txt, txt_ids, vec = pipe.encode_prompt([prompt])
    if shift_type == "linear":  # flux_utils' table lookup, written out
        zs_sig = (torch.from_numpy(np.linspace(1.0, 1 / steps, steps)).float() * 1000).floor() / 1000
        orig = rr.noised_references
        rr.noised_references = lambda xr, nz, n, *_: [(1 - s) * xr + s * nz for s in zs_sig]
    try:
        ref = rr.released_freecus(model, x_ref, noise, rr.freecus_indices(subject, H, W), txt, txt_ids, vec,
                                  sampling.image_ids(1, H, W), steps, H, W, vital, extend_scale=1.2)
    finally:
        if shift_type == "linear":
            rr.noised_references = orig
    assert (ours - ref).abs().max() < 3e-5     # measured ~1.5e-6; μ from the token count instead: 1.3e-4
    assert _mean_pixel(pipe, ours, ref, H, W) <= 1 / 255
    paper = pipe.freecus("a dog surfing", Reference(x, subject), caption="brown fur", vital_layers=vital,
                         lambda_prompt=1.2, steps=steps, seed=seed, return_latents=True)
    assert (paper - ref).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- CLI

def _params(path):
    return json.loads(Image.open(path).text["minidit"])["settings"]  # the resolved settings (issue 14's record)


SETTING_KEYS = {"personalize": PersonalizeSettings, "inpaint": EditSettings, "outpaint": EditSettings,
                "freecus": FreeCusSettings}


@pytest.mark.parametrize("command", ["personalize", "inpaint", "outpaint", "freecus"])
def test_cli_presets_and_one_override(repo, tmp_path, command):
    ref_png, mask_png = tmp_path / "ref.png", tmp_path / "mask.png"
    to_pil(picture(16)).save(ref_png)
    Image.fromarray((ellipse(45, 60, 25, 35) * 255).to(torch.uint8).numpy()).save(mask_png)
    args = {"personalize": ["--ref", str(ref_png), "--mask", str(mask_png)],
            "inpaint": ["--image", str(ref_png), "--mask", str(mask_png)],
            "outpaint": ["--image", str(ref_png), "--canvas", "160x128", "--offset", "8,8"],
            "freecus": ["--ref", str(ref_png), "--mask", str(mask_png)]}[command]
    common = [command, "--weights", str(repo), "--prompt", "a toy", "--steps", "2", "--seed", "1", *args]
    cls = SETTING_KEYS[command]
    fields = [f for f in cls().asdict()]
    outs = {}
    override = {"freecus": ("--lambda-prompt", "1.3", "lambda_prompt", 1.3)}.get(command, ("--tau", "30", "tau", 30.0))
    runs = {"paper": [], "official": ["--preset", "official"],
            "override": ["--preset", "official", override[0], override[1]],
            "set": ["--preset", "official", "--set", "vae_seed=9"]}
    for name, extra in runs.items():
        if command == "outpaint" and name == "paper":
            extra = ["--offset", "16,16"]                              # paper: the image must fit the canvas
        out = tmp_path / f"{name}.png"
        main(common + extra + ["--output", str(out)])
        outs[name] = _params(out)
    assert outs["paper"]["preset"] == "paper" and outs["official"]["preset"] == "official"
    assert {k: outs["paper"][k] for k in fields} == cls.paper().asdict()
    assert {k: outs["official"][k] for k in fields} == cls.official().asdict()
    changed = {k for k in fields if outs["override"][k] != outs["official"][k]}
    assert changed == {override[2]} and outs["override"][override[2]] == override[3]
    changed = {k for k in fields if outs["set"][k] != outs["official"][k]}
    assert changed == {"vae_seed"} and outs["set"]["vae_seed"] == 9
