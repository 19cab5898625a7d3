"""FreeCus: the σ' schedule, the vital-layer attention against an independent computation, plain generation when
nothing is shared, no influence of masked-out reference tokens, errors, the pipeline entry and the CLI."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import minidit.transformer as transformer_module
from minidit import sampling
from minidit.attention import attention_reference, set_backend
from minidit.freecus import (FILTER_TEMPLATE, FLUX1_VITAL_LAYERS, LAMBDA_PROMPT, LAMBDA_REF, check_vital_layers,
                             NoisedReference, default_vital_layers, freecus_refstate, noised_reference,
                             reference_sigmas, with_caption)
from minidit.masks import Reference
from minidit.refstate import RefState
from minidit.rope import apply_rope
from minidit.transformer import Flux
from minidit.weights.tiny_flux import TINY, random_state_dict

H_TOK, W_TOK, L_TXT = 4, 5, 6            # a 4x5 token grid (64x80 pixels) and 6 text tokens
N = H_TOK * W_TOK
SUBJECT = torch.tensor([1, 2, 6, 7, 8, 12])  # subject tokens of the reference (row-major)


@pytest.fixture(scope="module")
def model():
    m = Flux(TINY)
    m.load_state_dict(random_state_dict(TINY, seed=3))
    return m.eval()


def inputs(B, seed=0, cfg=TINY):
    """Random targets (B items) and a reference on the same grid."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(H_TOK, W_TOK, 3)
    ids[..., 1] = torch.arange(H_TOK)[:, None]
    ids[..., 2] = torch.arange(W_TOK)[None, :]
    return dict(img=torch.randn(B, N, 64, generator=g), img_ids=ids.reshape(1, N, 3).expand(B, -1, -1),
                txt=torch.randn(B, L_TXT, cfg.context_in_dim, generator=g), txt_ids=torch.zeros(B, L_TXT, 3),
                vec=torch.randn(B, cfg.vec_in_dim, generator=g),
                ref_latent=torch.randn(1, N, 64, generator=g), ref_noise=torch.randn(1, N, 64, generator=g),
                ref_txt=torch.randn(1, L_TXT, cfg.context_in_dim, generator=g),
                ref_vec=torch.randn(1, cfg.vec_in_dim, generator=g))


def run(model, x, steps=3, guidance=3.5, **kw):
    timesteps = sampling.get_schedule(steps, N)
    sigmas = kw.pop("ref_sigmas", reference_sigmas(steps, N))
    branch = NoisedReference(model, x["ref_latent"], x["ref_noise"], sigmas, kw.pop("subject", SUBJECT),
                             x["img_ids"][:1], x["ref_txt"], x["txt_ids"][:1], x["ref_vec"], **kw)
    return sampling.denoise(model, x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["vec"], timesteps, guidance,
                            branch=branch)


# ------------------------------------------------------------------------------------------- σ' schedule

def mu_of(seq_len):  # FLUX's dynamic shift, written out: 0.5 at 256 tokens, 1.15 at 4096, linear in between
    return 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)


@pytest.mark.parametrize("height,width,steps", [(256, 256, 4), (512, 512, 30), (1024, 1024, 28), (768, 1344, 10),
                                                (64, 80, 3)])
def test_reversed_shift_matches_formula(height, width, steps):
    seq = (height // 16) * (width // 16)
    mu = mu_of(seq)
    s = [1 - i / steps for i in range(steps)]
    expected = torch.tensor([math.exp(-mu) / (math.exp(-mu) + (1 / si - 1)) for si in s])
    got = reference_sigmas(steps, seq, ans=True)
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    # the reference is seen at lower noise than the dev target (μ > 0), both start from pure noise
    target = sampling.get_schedule(steps, seq, shift=True)[:-1]
    assert got[0] == 1 and target[0] == 1
    if steps > 1:
        assert (got[1:] < target[1:]).all()


@pytest.mark.parametrize("seq,steps", [(1024, 30), (4096, 28), (320, 5)])
def test_reversed_shift_matches_the_authors_scheduler_path(seq, steps):
    """The authors build σ' with diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/n, n),
    mu=-calculate_shift(seq)) and noise the reference with scheduler.scale_noise; same numbers here (with the
    paper's seq = image tokens; their released code passes seq = 16, see `ans_mu`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                            base_shift=0.5, max_shift=1.15, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=-mu_of(seq))
    torch.testing.assert_close(reference_sigmas(steps, seq), sched.sigmas[:-1].float(), atol=2e-6, rtol=0)
    x, eps = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    i = steps // 2
    z = sched.scale_noise(x, sched.timesteps[i:i + 1], eps)
    torch.testing.assert_close(noised_reference(x, eps, float(reference_sigmas(steps, seq)[i])), z, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [True, False])
def test_ans_off_is_the_targets_noise_level(shift):
    for seq in (256, 1024, 4096):
        torch.testing.assert_close(reference_sigmas(12, seq, ans=False, shift=shift),
                                   sampling.get_schedule(12, seq, shift=shift)[:-1], atol=0, rtol=0)


class Recorder:
    """Wraps the model to see what the FreeCus loop feeds it."""

    def __init__(self, model):
        self.model, self.cfg, self.calls = model, model.cfg, []

    def __call__(self, img, img_ids, txt, txt_ids, t, y, g=None, ref=None):
        self.calls.append((img.clone(), t.clone(), ref))
        return self.model(img, img_ids, txt, txt_ids, t, y, g, ref=ref)


@pytest.mark.parametrize("ans", [True, False])
@pytest.mark.parametrize("ref_time", ["target", "sigma"])
def test_loop_noises_the_reference_to_sigma_prime(model, ans, ref_time):
    x, steps = inputs(2), 4
    rec = Recorder(model)
    timesteps = sampling.get_schedule(steps, N)
    sigmas = reference_sigmas(steps, N, ans=ans)
    run(rec, x, steps=steps, ref_sigmas=sigmas, ref_time=ref_time)
    assert len(rec.calls) == steps
    for i, (img, t, ref) in enumerate(rec.calls):
        sigma = float(sigmas[i])
        expected = (1 - sigma) * x["ref_latent"] + sigma * x["ref_noise"]  # z_t = (1 - σ'_t) z_ref + σ'_t ε
        torch.testing.assert_close(img[:1], expected, atol=1e-6, rtol=0)
        assert img.shape[0] == 3 and ref.n_ref == 1
        assert float(t[0]) == pytest.approx(float(timesteps[i]) if ref_time == "target" else sigma, abs=1e-7)
        assert torch.allclose(t[1:], timesteps[i])
        if not ans:  # ans off: the reference sits at the target's noise level
            assert sigma == pytest.approx(float(timesteps[i]), abs=1e-7)


# ------------------------------------------------------------------------------------------- vital layers

def test_default_vital_layers():
    assert default_vital_layers(19, 38) == list(FLUX1_VITAL_LAYERS)
    assert default_vital_layers(TINY.depth, TINY.depth_single_blocks) == [0, 1, 2, 3]
    assert default_vital_layers(8, 38) == [0, 1, 7, 8 + 6, 8 + 9, 8 + 34, 8 + 35, 8 + 37]  # a distilled 8-double model
    assert check_vital_layers([3, 0, 3], 4) == [0, 3]
    for bad in ([4], [-1], [0, 57]):
        with pytest.raises(ValueError, match="out of range.*4 attention layers"):
            check_vital_layers(bad, 4)
    with pytest.raises(TypeError, match="integers"):
        check_vital_layers(["1"], 4)


def test_out_of_range_vital_layer_in_the_loop(model):
    with pytest.raises(ValueError, match="vital layer 17 is out of range"):
        run(model, inputs(1), steps=1, vital_layers=FLUX1_VITAL_LAYERS)  # FLUX.1's list on the 4-layer tiny model


def joint_attention_recorder(monkeypatch):
    calls = []
    real = transformer_module.joint_attention

    def wrapped(q, k, v, pe, n_txt, ref, layer):
        out = real(q, k, v, pe, n_txt, ref, layer)
        calls.append(dict(layer=layer, q=q, k=k, v=v, pe=pe, n_txt=n_txt, shared=ref is not None and ref.shares(layer),
                          out=out))
        return out
    monkeypatch.setattr(transformer_module, "joint_attention", wrapped)
    return calls


def softmax_attention(q, keys, vals, scales):
    """softmax(s_j q·k_j / √D) V for one item: q (H, L, D), keys/vals (H, S, D), scales (S,) -> (L, H·D)."""
    logits = (q.double() @ keys.double().transpose(-1, -2)) / math.sqrt(q.shape[-1]) * scales.double()
    out = logits.softmax(-1) @ vals.double()
    return out.transpose(0, 1).reshape(q.shape[1], -1).float()


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_vital_layers_attend_to_subject_kv_and_others_plainly(model, monkeypatch, backend):
    calls = joint_attention_recorder(monkeypatch)
    set_backend(backend)
    try:
        x, vital, lr, lp = inputs(2, seed=1), [1, 2], 1.3, 0.7   # layer 1 double, layer 2 single, λ_r ≠ λ_p ≠ 1
        run(model, x, steps=2, vital_layers=vital, lambda_ref=lr, lambda_prompt=lp)
    finally:
        set_backend(None)
    assert [c["layer"] for c in calls] == [0, 1, 2, 3] * 2
    for c in calls:
        q, k, v, pe, T = c["q"], c["k"], c["v"], c["pe"], c["n_txt"]
        qr, kr = apply_rope(q, pe), apply_rope(k, pe)
        # the reference leaves the batch after the last vital layer (2): layer 3 sees only the 2 targets
        assert q.shape[0] == (3 if c["layer"] <= max(vital) else 2)
        assert c["shared"] == (c["layer"] in vital)
        for b in range(q.shape[0]):
            plain = softmax_attention(qr[b], kr[b], v[b], torch.ones(k.shape[2]))
            is_target = q.shape[0] == 2 or b >= 1
            if c["layer"] in vital and is_target:
                # [subject K/V of the reference (item 0, its own RoPE); text; image], keys scaled λ_r, λ_p, 1
                ref_k = kr[0, :, T:][:, SUBJECT]
                ref_v = v[0, :, T:][:, SUBJECT]
                keys = torch.cat([ref_k, kr[b]], dim=1)
                vals = torch.cat([ref_v, v[b]], dim=1)
                s = torch.cat([torch.full((len(SUBJECT),), lr), torch.full((T,), lp), torch.ones(N)])
                expected = softmax_attention(qr[b], keys, vals, s)
                torch.testing.assert_close(c["out"][b], expected, atol=2e-5, rtol=1e-4)
                # the same through the library's readable definition, with the subject gathered by the test
                lib = attention_reference(qr[b:b + 1], kr[b:b + 1], v[b:b + 1], ref_k[None], ref_v[None],
                                          None, lr, lp, T)[0].transpose(0, 1).reshape(q.shape[2], -1)
                torch.testing.assert_close(c["out"][b], lib, atol=2e-5, rtol=1e-4)
                assert (c["out"][b] - plain).abs().max() > 1e-3  # the sharing does change the target
            else:
                torch.testing.assert_close(c["out"][b], plain, atol=2e-5, rtol=1e-4)


def test_refstate_is_what_the_issue_describes():
    state = freecus_refstate(SUBJECT, [0, 2, 3], 1.2, 0.9)
    assert isinstance(state, RefState) and state.n_ref == 1 and state.share and not state.replace
    assert state.positions == "own" and state.mask_mode == "exclude" and state.last_layer == 3
    assert [state.shares(i) for i in range(4)] == [True, False, True, True]
    assert (state.lambda_ref, state.lambda_txt) == (1.2, 0.9)
    assert (LAMBDA_REF, LAMBDA_PROMPT) == (1.1, 1.1)  # the authors' code: register(scale=1.1), --extend_scale 1.1


# ------------------------------------------------------------------------------------------- plain when nothing is shared

def test_reference_in_the_batch_without_sharing_does_not_touch_the_targets(model):
    """The batched path itself: reference as item 0, a RefState sharing no layer and λ = 1 -> targets unchanged."""
    x = inputs(2, seed=4)
    B = 2
    t = torch.full((B + 1,), 0.6)
    state = RefState(n_ref=1, src=[SUBJECT], share=True, layers=frozenset())
    with torch.no_grad():
        both = model(torch.cat([x["ref_latent"], x["img"]]), torch.cat([x["img_ids"][:1], x["img_ids"]]),
                     torch.cat([x["ref_txt"], x["txt"]]), torch.cat([x["txt_ids"][:1], x["txt_ids"]]), t,
                     torch.cat([x["ref_vec"], x["vec"]]), torch.full((B + 1,), 3.5), ref=state)
        alone = model(x["img"], x["img_ids"], x["txt"], x["txt_ids"], t[1:], x["vec"], torch.full((B,), 3.5))
    # a different batch size changes the CPU GEMM blocking: ~2e-6 of float noise, not a leak (a leak is >= 1e-3)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- masked-out tokens

@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_masked_out_reference_kv_have_no_influence(model, monkeypatch, mask_mode):
    """Perturb the shared reference keys/values of masked-out tokens inside every vital layer: the targets'
    result does not move. Perturbing subject tokens the same way does (so the check can fail)."""
    x = inputs(2, seed=5)
    real = RefState.reference_kv
    perturb = {"rows": None}

    def noisy_kv(self, k, v, pe, n_txt, layer):
        rk, rv, m = real(self, k, v, pe, n_txt, layer)
        if perturb["rows"] is not None:
            rows = perturb["rows"](m)  # (T, R) bool
            g = torch.Generator().manual_seed(9)
            rk = torch.where(rows[:, None, :, None], 50 * torch.randn(rk.shape, generator=g), rk)
            rv = torch.where(rows[:, None, :, None], 50 * torch.randn(rv.shape, generator=g), rv)
        return rk, rv, m
    monkeypatch.setattr(RefState, "reference_kv", noisy_kv)
    kw = dict(vital_layers=[0, 1, 2, 3], mask_mode=mask_mode)
    base = run(model, x, **kw)
    perturb["rows"] = lambda m: ~m
    torch.testing.assert_close(run(model, x, **kw), base, atol=1e-6, rtol=0)
    perturb["rows"] = lambda m: m
    assert (run(model, x, **kw) - base).abs().max() > 1e-2


def test_reference_pixels_outside_the_mask_do_not_matter_on_the_first_layer(model):
    """At layer 0 a reference token's K/V depend only on that token's latent (projections and norms are row-wise),
    so with vital layer 0 only, changing the reference latent outside the subject changes nothing in the target."""
    x = inputs(2, seed=6)
    base = run(model, x, vital_layers=[0])
    outside = torch.ones(N, dtype=torch.bool)
    outside[SUBJECT] = False
    y = dict(x, ref_latent=torch.where(outside[None, :, None], torch.randn(1, N, 64) * 3, x["ref_latent"]))
    torch.testing.assert_close(run(model, y, vital_layers=[0]), base, atol=1e-6, rtol=0)
    inside = dict(x, ref_latent=torch.where(~outside[None, :, None], torch.randn(1, N, 64) * 3, x["ref_latent"]))
    assert (run(model, inside, vital_layers=[0]) - base).abs().max() > 1e-3


def test_loop_errors(model):
    x = inputs(1)
    with pytest.raises(ValueError, match="subject mask is empty"):
        run(model, x, steps=1, subject=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="target's size"):
        run(model, dict(x, ref_latent=torch.randn(1, N + 1, 64)), steps=1)
    with pytest.raises(ValueError, match="ref_time"):
        run(model, x, steps=1, ref_time="later")


def test_caption_template():
    assert with_caption("a stork dancing", "white feathers, long red beak") == "a stork dancing. white feathers, long red beak"
    assert with_caption("a stork", None) == "a stork" and with_caption("a stork", "  ") == "a stork"
    assert "{subject}" in FILTER_TEMPLATE and "{description}" in FILTER_TEMPLATE


# ------------------------------------------------------------------------------------------- the pipeline entry

HP, WP = 64, 80  # pixels: the 4 x 5 token grid


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from minidit.weights.tiny import write_tiny_repo
    return write_tiny_repo(tmp_path_factory.mktemp("freecus") / "FLUX.1-dev", "dev", seed=2)


@pytest.fixture(scope="module")
def pipe(repo):
    from minidit.pipeline import Pipeline
    return Pipeline.load(repo, device="cpu")


def picture(seed=0, height=HP, width=WP):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(3, height // 16, width // 16, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low[None], size=(height, width), mode="bilinear")[0].clamp(-1, 1)


def box(x, y, bw, bh, height=HP, width=WP):
    m = torch.zeros(height, width)
    m[y:y + bh, x:x + bw] = 1
    return m


REF = Reference(picture(), box(16, 16, 48, 32))  # tokens rows 1-2, cols 1-3


def test_pipeline_without_vital_layers_is_generate(pipe, monkeypatch):
    """An empty vital-layer list is refused (it would silently be plain generation); forced past that check,
    the sampler without sharing is exactly `generate`."""
    kw = dict(height=HP, width=WP, steps=3, seed=5, guidance=3.5, return_latents=True)
    with pytest.raises(ValueError, match="vital_layers is empty"):
        pipe.freecus("a corgi on a beach", REF, vital_layers=[], **kw)
    plain = pipe.generate("a corgi on a beach", **kw)
    import minidit.freecus as fc
    with monkeypatch.context() as m:
        m.setattr(fc, "check_vital_layers", lambda layers, n: [])
        ours = pipe.freecus("a corgi on a beach", REF, lambda_ref=1.0, lambda_prompt=1.0, **kw)
    assert torch.equal(ours, plain)
    shared = pipe.freecus("a corgi on a beach", REF, **kw)  # default vital layers: all four of the tiny model
    assert (shared - plain).abs().max() > 1e-3


def test_pipeline_prompts_caption_and_reference(pipe, monkeypatch):
    seen, real = [], pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda p: (seen.append(list(p)), real(p))[1])
    rec = Recorder(pipe.transformer)
    monkeypatch.setattr(pipe, "transformer", rec)
    imgs = pipe.freecus("a stork dancing", REF, caption="white feathers, red beak", steps=2, num_images=2, seed=4)
    assert seen[-1] == ["a stork dancing. white feathers, red beak"] * 3   # [reference; 2 targets]: the authors'
    assert len(imgs) == 2 and imgs[0].size == (WP, HP)
    # the reference latent fed at step 0 is pure ε (σ'_0 = 1) = the first target's own initial noise
    img0, _, ref = rec.calls[0]
    assert torch.equal(img0[0], img0[1]) and ref.src[0].tolist() == [6, 7, 8, 11, 12, 13]
    # ... and at step 1 it is the reference image's latent noised to σ'_1
    x_ref = pipe.encode_image(REF.image[None])
    s1 = float(reference_sigmas(2, 20)[1])
    torch.testing.assert_close(rec.calls[1][0][:1], (1 - s1) * x_ref + s1 * img0[:1], atol=1e-5, rtol=0)
    pipe.freecus("a stork", Reference(REF.image, REF.mask, prompt="a photo of a stork"), steps=1)
    assert seen[-1] == ["a photo of a stork", "a stork"]


def test_pipeline_resizes_the_reference_to_the_target(pipe):
    small = Reference(picture(height=32, width=48), box(0, 0, 32, 32, 32, 48))
    out = pipe.freecus("a cup", small, height=HP, width=WP, steps=1, return_latents=True)
    assert out.shape == (1, 20, 64)
    odd = Image.new("RGB", (50, 40), (200, 30, 30))  # a PIL reference of any size, resized to the target's
    assert pipe.freecus("a cup", Reference(odd), height=HP, width=WP, steps=1, return_latents=True).shape == (1, 20, 64)
    with pytest.raises(ValueError, match="not a multiple of 16: pass height and width"):
        pipe.freecus("a cup", Reference(odd), steps=1)


def test_pipeline_errors(pipe):
    with pytest.raises(ValueError, match="subject mask is empty"):
        pipe.freecus("x", Reference(picture(), torch.zeros(HP, WP)), steps=1)
    with pytest.raises(ValueError, match="differs from the image size"):
        pipe.freecus("x", Reference(picture(), torch.ones(HP, WP + 16)), steps=1)
    with pytest.raises(ValueError, match="vital layer 56 is out of range.*4 attention layers"):
        pipe.freecus("x", REF, vital_layers=[0, 56], steps=1)
    with pytest.raises(ValueError, match="one reference"):
        pipe.freecus("x", [REF, REF], steps=1)
    with pytest.raises(ValueError, match="outside"):
        pipe.freecus("x", Reference(picture(), (70, 0, 32, 16)), steps=1)


def test_cli(pipe, repo, tmp_path):
    from minidit.cli import main
    ref_png, mask_png, out = tmp_path / "ref.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(((picture().permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()).save(ref_png)
    Image.fromarray((REF.mask * 255).to(torch.uint8).numpy()).save(mask_png)
    args = ["freecus", "--weights", str(repo), "--ref", str(ref_png), "--mask", str(mask_png), "--prompt", "a dog",
            "--caption", "brown fur", "--steps", "2", "--vital-layers", "0,3", "--lambda-prompt", "1.2",
            "--seed", "0", "--output", str(out)]  # the API's default seed (the CLI's default is random)
    main(args)
    im = Image.open(out)
    assert im.size == (WP, HP)
    assert im.text["command"] == "freecus" and im.text["caption"] == "brown fur"
    assert im.text["vital_layers"] == "[0, 3]" and im.text["lambda_prompt"] == "1.2"
    assert im.text["mu_shift_type"] == "negative" and im.text["preset"] == "paper"
    # the CLI image is the Python API's image
    api = pipe.freecus("a dog", Reference(str(ref_png), str(mask_png)), caption="brown fur", steps=2,
                       vital_layers=[0, 3], lambda_prompt=1.2)[0]
    assert np.array_equal(np.asarray(api), np.asarray(im.convert("RGB")))
    with pytest.raises(SystemExit, match="vital layer 9 is out of range"):
        main(args[:-4] + ["--vital-layers", "0,9", "--output", str(out)])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        main(args[:-4] + ["--vital-layers", "0;1", "--output", str(out)])


def test_cli_box_mask_equals_api_box(pipe, repo, tmp_path):
    """`--mask x,y,w,h` is a pixel box, as for `minidit personalize`."""
    from minidit.cli import main
    ref_png, out = tmp_path / "ref.png", tmp_path / "out.png"
    Image.fromarray(((picture().permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()).save(ref_png)
    main(["freecus", "--weights", str(repo), "--ref", str(ref_png), "--mask", "16,16,32,32", "--prompt", "a dog",
          "--steps", "2", "--seed", "0", "--output", str(out)])
    api = pipe.freecus("a dog", Reference(str(ref_png), (16, 16, 32, 32)), steps=2)[0]
    assert np.array_equal(np.asarray(api), np.asarray(Image.open(out).convert("RGB")))
    assert Image.open(out).text["mask"] == "16,16,32,32"


def test_ans_mu_override_reproduces_the_released_code():
    """flux_utils.pil_to_latents_flux computes image_seq_len from the latent size: 16 at 512², μ ≈ 0.459."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    mu16 = calculate_shift(16, 256, 4096, 0.5, 1.15)
    assert mu16 == pytest.approx(0.4594, abs=1e-4)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                            base_shift=0.5, max_shift=1.15, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 30, 30), mu=-mu16)
    torch.testing.assert_close(reference_sigmas(30, 1024, mu=mu16), sched.sigmas[:-1].float(), atol=2e-6, rtol=0)
    assert not torch.allclose(reference_sigmas(30, 1024), reference_sigmas(30, 1024, mu=mu16), atol=1e-3)
