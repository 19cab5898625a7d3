"""The tiny model's training code: a few steps of every stage (CI's smoke test), loss going down, checkpoints
that round-trip, and a repository that minidit loads."""
import random

import pytest
import torch

from minidit.weights import train_ae as A, train_common as C, train_dit as D, train_tiny as T


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    T.main(["--work", str(work), "--smoke", "--threads", "2", "--tune-steps", "4"])
    return work


def test_smoke_run_writes_a_loadable_repository(smoke):
    from minidit.pipeline import Pipeline
    out = smoke / "repo-final"
    for name in ("flux1-schnell.safetensors", "ae.safetensors", "transformer/config.json", "vae/config.json",
                 "text_encoder/model.safetensors", "tokenizer_2/spiece.model", "scheduler/scheduler_config.json"):
        assert (out / name).exists(), name
    pipe = Pipeline.load(out, device="cpu")
    assert pipe.transformer.cfg == D.DIT
    ae = pipe.ae.cfg
    assert (ae.ch, ae.ch_mult, ae.num_res_blocks, ae.z_channels) == (A.AE.ch, A.AE.ch_mult, A.AE.num_res_blocks, 16)
    assert ae.scale_factor != 0.3611 and ae.shift_factor != 0.1159  # measured on the data, read back from the file
    img = pipe.generate("a red circle on the left", height=64, width=64, steps=2)[0]
    assert img.size == (64, 64)


def test_autoencoder_width_lets_a_flat_colour_through_the_last_norm():
    """The decoder's last GroupNorm normalises each group over its channels and all pixels: on a flat area a group
    of 2 channels keeps only a sign, one of 3 a continuous number (weights/README.md). So AE keeps >= 3 channels
    per group there, and two flat colours stay apart after that norm."""
    from minidit.autoencoder import AutoEncoder
    norm = AutoEncoder(A.AE).decoder.norm_out
    assert norm.num_channels // norm.num_groups >= 3
    torch.manual_seed(0)
    mix = torch.randn(norm.num_channels, 3, dtype=torch.float64)  # some per-channel reading of a colour

    def after_norm(n: torch.nn.GroupNorm, rgb) -> torch.Tensor:
        x = (mix[:n.num_channels] @ torch.tensor(rgb, dtype=torch.float64))[None, :, None, None].expand(1, -1, 8, 8)
        return torch.nn.functional.group_norm(x, n.num_groups, eps=n.eps)
    a, b = (0.9, 0.1, 0.1), (0.8, 0.3, 0.2)
    assert (after_norm(norm, a) - after_norm(norm, b)).abs().max() > 0.01
    assert (after_norm(norm, a).abs() - 1).abs().max() > 0.1                # values, not just signs
    two = torch.nn.GroupNorm(32, 64, eps=norm.eps)                           # the 64-wide run's last norm
    assert (after_norm(two, a).abs() - 1).abs().max() < 1e-3                 # every value +-1: signs only


def test_checkpoint_round_trips(smoke, tmp_path):
    model = D.init_dit(D.DIT, seed=1)
    ema = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(1, 4, 64), torch.zeros(1, 4, 3), torch.randn(1, 3, 32), torch.zeros(1, 3, 3),
          torch.rand(1), torch.randn(1, 32)).square().mean().backward()
    opt.step()
    C.save_checkpoint(tmp_path / "c.safetensors", model, ema, opt, 7, 99, 0.5)
    model2, ema2 = D.init_dit(D.DIT, seed=2), {k: torch.zeros_like(v) for k, v in ema.items()}
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    assert C.load_checkpoint(tmp_path / "c.safetensors", model2, ema2, opt2) == (7, 99)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(ema[k], ema2[k]) for k in ema)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)


def test_light_checkpoint_resumes_the_ae_stage_from_its_ema_weights(tmp_path, monkeypatch):
    """A light checkpoint keeps a stage's EMA weights alone (fp16, small enough to commit); the stage resumes from
    it at the same step with those weights as model and EMA, fresh AdamW moments and its lr warmed up again."""
    from safetensors.torch import load_file

    from minidit.autoencoder import AutoEncoder
    ae = AutoEncoder(A.AE)
    ema = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in ae.state_dict().items()}
    opt = torch.optim.AdamW(ae.parameters(), lr=1e-3)
    ae.decoder(torch.randn(1, 16, 4, 4)).square().mean().backward()
    opt.step()
    full, light = tmp_path / "full.safetensors", tmp_path / "light.safetensors"
    C.save_checkpoint(full, ae, ema, opt, 2, 4, 0.5)               # 2 of 4 steps done
    C.light_checkpoint(full, light)
    sd = load_file(light)
    assert set(sd) == {f"model.{k}" for k in ema} and light.stat().st_size < full.stat().st_size / 6
    assert all(torch.equal(sd[f"model.{k}"], v.half()) for k, v in ema.items() if v.is_floating_point())
    ae2 = AutoEncoder(A.AE)
    ema2 = {k: torch.zeros_like(v) for k, v in ae2.state_dict().items()}
    opt2 = torch.optim.AdamW(ae2.parameters(), lr=1e-3)
    assert C.load_checkpoint(light, ae2, ema2, opt2) == (2, 4) and not opt2.state
    for k, v in ae2.state_dict().items():
        assert torch.equal(v, sd[f"model.{k}"].to(v.dtype)) and torch.equal(ema2[k], v), k
    work = tmp_path / "work"
    work.mkdir()
    light.rename(work / "b.ckpt.safetensors")
    seen, real = [], C.rewarm
    monkeypatch.setattr(A, "rewarm", lambda step, start, fresh, **k: seen.append((step, start, fresh)) or
                        real(step, start, fresh, **k))
    A.stage_ae(work, 4, 0, batch=1, size=32, out="b.safetensors")
    assert seen == [(2, 2, True), (3, 2, True)] and (work / "b.safetensors").exists()
    assert C.rewarm(10, 10, True) == 1 / 50 and C.rewarm(59, 10, True) == 1.0 and C.rewarm(10, 10, False) == 1.0


def test_ae_stage_resumes_from_its_checkpoint(tmp_path):
    """The autoencoder stage trains AE's widths on whole renders and checkpoints model, EMA and AdamW; run again
    on a finished checkpoint it trains nothing and writes the same EMA weights."""
    from safetensors.torch import load_file
    A.stage_ae(tmp_path, 2, 0, batch=1, size=32, out="a.safetensors")
    assert (tmp_path / "a.ckpt.safetensors").exists()
    first = load_file(tmp_path / "a.safetensors")
    assert first["encoder.conv_in.weight"].shape[0] == A.AE.ch
    from_ckpt = A.load_ae(tmp_path / "a.ckpt.safetensors").state_dict()   # its EMA weights: what was written
    assert all(torch.equal(first[k], v) for k, v in from_ckpt.items())
    (tmp_path / "a.safetensors").unlink()
    A.stage_ae(tmp_path, 2, 0, batch=1, size=32, out="a.safetensors")
    again = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)
    A.stage_ae(tmp_path, 2, 0, batch=1, size=32, init="a.safetensors", out="b.safetensors")  # the next phase
    assert any(not torch.equal(first[k], v) for k, v in load_file(tmp_path / "b.safetensors").items())


def test_crops_of_whole_renders(tmp_path, monkeypatch):
    """crop_batch: one crop per render, a slice of it, at a border on an axis half the time (4000 draws: 0.5 ±
    0.03); stage_ae with crop_from trains on those crops of whole renders of that size."""
    x = torch.arange(5 * 3 * 64 * 64, dtype=torch.float32).reshape(5, 3, 64, 64)
    rng = random.Random(0)
    c = A.crop_batch(x, 16, rng)
    assert c.shape == (5, 3, 16, 16)
    for img, crop in zip(x, c):  # each crop is the slice at its own offset (the values encode their position)
        a, b = int(crop[0, 0, 0]) % (64 * 64) // 64, int(crop[0, 0, 0]) % 64
        assert torch.equal(crop, img[:, a:a + 16, b:b + 16])
    rows = [int(A.crop_batch(x[:1], 16, rng)[0, 0, 0, 0]) // 64 for _ in range(4000)]
    border = sum(r in (0, 48) for r in rows) / len(rows)
    assert abs(border - (0.5 + 0.5 * 2 / 49)) < 0.03                  # half at a border, plus the uniform half's share
    seen = []
    real = A.crop_batch
    monkeypatch.setattr(A, "crop_batch", lambda x, size, rng: seen.append(tuple(x.shape)) or real(x, size, rng))
    A.stage_ae(tmp_path, 1, 0, batch=2, size=32, out="c.safetensors", crop_from=64)
    assert seen == [(2, 3, 64, 64)] and (tmp_path / "c.safetensors").exists()


def test_bf16_autocast_runs_on_the_cpu_with_the_device_code():
    """--device cuda's path (bf16 autocast, tensors moved to the device) is the CPU's with --bf16: the DiT loss
    under autocast is close to the fp32 one (same draws), and an autoencoder step runs."""
    import tempfile
    from pathlib import Path
    torch.manual_seed(0)
    model = D.init_dit(D.DIT, seed=0)
    for p in model.parameters():  # adaLN-Zero starts at zero velocity: give it an output
        torch.nn.init.normal_(p, std=0.02)
    lat, txt, vec = torch.randn(2, 16, 32, 32), torch.randn(2, 48, 32), torch.randn(2, 32)
    from minidit import sampling
    ids = sampling.image_ids(2, 256, 256)
    loss = {bf16: D.rf_loss(model, lat, txt, vec, ids, torch.Generator().manual_seed(1), bf16=bf16).item()
            for bf16 in (False, True)}
    assert abs(loss[True] - loss[False]) < 0.02 * loss[False], loss
    with tempfile.TemporaryDirectory() as d:
        A.stage_ae(Path(d), 1, 0, batch=1, size=32, bf16=True, device=torch.device("cpu"))
        assert (Path(d) / "ae_phase0.safetensors").exists()


def test_render_workers_give_the_same_images():
    """--workers only renders the scenes the training process draws, so the data do not depend on it."""
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        a = A.world_images(random.Random(3), 3, 32, pool)
    b = A.world_images(random.Random(3), 3, 32)
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_until_stops_after_a_stage(tmp_path):
    """--until STAGE runs the stages up to it and exports nothing (the cheapest stage here; ae, data and dit stop
    the same way)."""
    T.main(["--work", str(tmp_path), "--smoke", "--threads", "2", "--until", "text"])
    assert (tmp_path / "repo" / "text_encoder_2").exists()
    assert not list(tmp_path.glob("ae_phase*")) and not (tmp_path / "repo-final").exists()


@pytest.mark.parametrize("device, message", [("nonsense", "not cpu or a CUDA device"), ("meta", "not cpu or a CUDA"),
                                             ("cuda", "CUDA is not available here")])
def test_bad_devices_are_refused_before_anything_is_written(tmp_path, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        T.main(["--work", str(tmp_path / "w"), "--device", device])
    assert message in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_dit_stage_extends_and_stops_at_a_step(smoke, tmp_path):
    """--extend stretches a finished run to a new total; --stop-at ends it early at a step of that schedule,
    and a step already reached trains nothing more."""
    import shutil

    from safetensors import safe_open
    work = tmp_path / "w"
    shutil.copytree(smoke, work)

    def meta():
        with safe_open(str(work / "dit.safetensors"), "pt") as f:
            return int(f.metadata()["step"]), int(f.metadata()["steps"])
    assert meta() == (6, 6)
    D.stage_dit(work, work / "repo", 10, 0, batch=4, extend=True, stop_at=8)
    assert meta() == (8, 10)
    before = (work / "dit.safetensors").read_bytes()
    D.stage_dit(work, work / "repo", 10, 0, batch=4, extend=True, stop_at=8)
    assert (work / "dit.safetensors").read_bytes() == before
    D.stage_dit(work, work / "repo", 10, 0, batch=4)
    assert meta() == (10, 10)


def test_tune_stage_trains_the_text_encoders_and_exports_them(smoke, tmp_path):
    """The tune stage trains T5 and CLIP with the DiT; export writes its EMA weights of all three (fp16), in
    the layouts the loaders read; resuming a finished tune trains nothing."""
    import shutil

    from safetensors.torch import load_file

    from minidit.pipeline import Pipeline
    tuned = load_file(smoke / "tune.safetensors")
    exported = Pipeline.load(smoke / "repo-final", device="cpu", dtype=torch.float32)
    before = {f"{m}.{k}": v for m, folder in (("t5", "text_encoder_2"), ("clip", "text_encoder"))
              for f in (smoke / "repo" / folder).glob("*.safetensors") for k, v in load_file(f).items()}
    frozen = [k for k, v in before.items() if torch.equal(tuned[f"model.{k}"], v.float())]
    # a key bias adds the same logit to every key of a query: softmax ignores it, so its gradient is zero
    assert all(k.endswith("k_proj.bias") for k in frozen) and len(frozen) < 3, frozen
    for m, module in (("t5", exported.text.t5), ("clip", exported.text.clip), ("dit", exported.transformer)):
        for k, v in module.state_dict().items():
            assert torch.equal(v.float(), tuned[f"ema.{m}.{k}"].half().float()), (m, k)
    work = tmp_path / "w"
    shutil.copytree(smoke, work)
    ckpt = (work / "tune.safetensors").read_bytes()
    D.stage_tune(work, work / "repo", 4, 0, batch=4)
    assert (work / "tune.safetensors").read_bytes() == ckpt


def test_frozen_tune_with_the_local_t5_trains_only_the_dit(smoke, tmp_path):
    """`--local-t5 --tune-text-lr 0`: the repository's T5 gets the designed position bias (every other encoder
    weight unchanged), the tune stage then trains the DiT alone, and export writes that T5."""
    import shutil

    from safetensors.torch import load_file

    from minidit.pipeline import Pipeline
    from minidit.weights.tiny_text import TINY_T5, local_position_bias
    work = tmp_path / "w"
    shutil.copytree(smoke, work)
    (work / "tune.safetensors").unlink()

    def encoders():
        return {f"{folder}/{k}": v for folder in ("text_encoder_2", "text_encoder")
                for f in (work / "repo" / folder).glob("*.safetensors") for k, v in load_file(f).items()}
    before = encoders()
    T.main(["--work", str(work), "--smoke", "--tune-steps", "4", "--tune-text-lr", "0", "--local-t5"])
    after = encoders()
    bias = f"text_encoder_2/{T.T5_BIAS}"
    assert torch.equal(after[bias].float(), local_position_bias(TINY_T5)) and not torch.equal(before[bias], after[bias])
    assert all(torch.equal(before[k], after[k]) for k in before if k != bias)
    tuned = load_file(work / "tune.safetensors")
    start = load_file(work / "dit.safetensors")
    assert any(not torch.equal(tuned[f"model.dit.{k[4:]}"], v) for k, v in start.items() if k.startswith("ema."))
    exported = Pipeline.load(work / "repo-final", device="cpu", dtype=torch.float32)
    assert torch.equal(exported.text.t5.state_dict()["encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
                                                     ".weight"], local_position_bias(TINY_T5))


def test_dit_loss_goes_down_on_a_fixed_batch(smoke):
    """The rectified-flow objective as the DiT stage computes it, on one fixed batch of the smoke latents."""
    from safetensors.torch import load_file

    from minidit import sampling
    from minidit.text_encoder import TextEncoder
    lat = load_file(smoke / "latents.safetensors")["latents"][:4].float()
    text = TextEncoder.load(smoke / "repo", device="cpu", dtype=torch.float32, max_length=D.T5_LENGTH)
    txt, vec = text.encode(["a red circle on the left"] * 4)
    model = D.init_dit(D.DIT, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x0, eps, t = sampling.pack(lat), torch.randn(4, 256, 64, generator=g), torch.rand(4, generator=g)
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    losses = []
    for _ in range(8):
        v = model(xt, sampling.image_ids(4, 256, 256), txt, sampling.text_ids(4, txt.shape[1]), t, vec)
        loss = (v - (eps - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # adaLN-Zero starts every block at the identity, so the first steps are slow: ask for a steady decrease
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses


def test_adaln_zero_init_starts_at_zero_velocity():
    model = D.init_dit(D.DIT, seed=0)
    out = model(torch.randn(2, 16, 64), torch.zeros(2, 16, 3), torch.randn(2, 5, 32), torch.zeros(2, 5, 3),
                torch.rand(2), torch.randn(2, 32))
    assert out.abs().max() == 0


def test_negative_tune_steps_are_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(SystemExit):
        T.main(["--work", str(tmp_path / "w"), "--tune-steps", "-1"])
    assert "--tune-steps must be >= 0" in capsys.readouterr().err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tune-steps", "4", "--tune-text-lr", "-1"], "--tune-text-lr must be >= 0"),
    (["--local-t5"], "--local-t5 needs --tune-steps"),
    (["--object-weight", "2"], "--object-weight needs --tune-steps"),
    (["--tune-steps", "4", "--object-weight", "-1"], "--object-weight must be a finite number >= 0"),
    (["--tune-steps", "4", "--object-weight", "nan"], "--object-weight must be a finite number >= 0"),
    (["--init-from", "/nonexistent/repo", "--tune-steps", "4"], "--init-from /nonexistent/repo: not a folder")])
def test_bad_tune_options_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        T.main(["--work", str(tmp_path / "w"), *argv])
    assert message in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_sampler_times_have_the_density_of_the_sampler_steps():
    """--tune-times sampler draws t as the sampler spaces its steps at 256 tokens (the same mu); the default
    logit-normal draws put far fewer at high noise (measured: 4.5 % above t = 0.9 vs the sampler's 15 %)."""
    from minidit import sampling
    steps = sampling.get_schedule(1000, 256)[:-1].double()
    g = torch.Generator().manual_seed(0)
    drawn = {d: D.train_times(20000, g, d).double() for d in D.T_DISTS}
    for q in (0.5, 0.8, 0.9, 0.97):
        share = float((steps > q).double().mean())
        assert abs(float((drawn["sampler"] > q).double().mean()) - share) < 0.015, q
    assert float((drawn["logit-normal"] > 0.9).double().mean()) < 0.5 * float((steps > 0.9).double().mean())


def test_object_cover_is_the_objects_share_of_each_token():
    """One object: its token coverage sits where it is drawn, sums to its area, and is zero elsewhere."""
    from minidit.weights import world
    scene = world.Scene((world.place(world.Subject("square", "red"), "on the left", "large"),), "flat", "blue")
    cover = D.object_cover([scene])
    assert cover.shape == (1, 256)
    grid = cover[0].view(16, 16)
    area = world.object_masks(scene, C.SIZE).sum() / 256.0
    assert abs(float(grid.sum()) - area) < 1e-3 * area
    ys, xs = torch.nonzero(grid > 0.5, as_tuple=True)
    assert xs.float().mean() < 6 and abs(ys.float().mean() - 7.5) < 1   # the left half, mid-height
    assert grid[:, 10:].abs().max() == 0


def test_weighted_rf_loss_is_the_weighted_mean_over_tokens():
    """Weights of one give the plain loss; a weight on one token only gives that token's squared error."""
    torch.manual_seed(0)
    lat = torch.randn(2, 16, 8, 8)
    fixed = torch.randn(2, 16, 64)
    forward = lambda xt, *a: fixed  # noqa: E731 - a model that always answers the same velocity
    ids, txt, vec = torch.zeros(2, 16, 3), torch.randn(2, 3, 32), torch.randn(2, 32)
    loss = lambda w: D.rf_loss(forward, lat, txt, vec, ids, torch.Generator().manual_seed(1), weight=w)  # noqa
    plain = D.rf_loss(forward, lat, txt, vec, ids, torch.Generator().manual_seed(1))
    assert torch.allclose(loss(torch.ones(2, 16)), plain, rtol=1e-6)
    one = torch.zeros(2, 16)
    one[1, 5] = 3.0
    g = torch.Generator().manual_seed(1)
    from minidit import sampling
    x0 = sampling.pack(lat)
    D.train_times(2, g)  # rf_loss draws the times first, then the noise
    eps = torch.randn(x0.shape, generator=g)
    assert torch.allclose(loss(one), (fixed[1, 5] - (eps - x0)[1, 5]).square().mean(), rtol=1e-5)
    assert not torch.allclose(loss(one), plain)


def test_init_from_a_repository_continues_from_its_weights(smoke, tmp_path, capsys):
    """--init-from seeds an empty work folder from an exported repository: with no training step the export
    gives back its DiT exactly and keeps its latent scale/shift (the data stage re-encodes, measures, and keeps
    the repository's factors); a non-empty work folder is refused and left as it was."""
    import json

    from safetensors.torch import load_file
    src = smoke / "repo-final"
    work, out = tmp_path / "w", tmp_path / "out"
    T.main(["--work", str(work), "--init-from", str(src), "--images", "8", "--batch", "2", "--out", str(out)])
    a, b = load_file(src / "flux1-schnell.safetensors"), load_file(out / "flux1-schnell.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va, vb = (json.loads((d / "vae" / "config.json").read_text()) for d in (src, out))
    assert (va["scaling_factor"], va["shift_factor"]) == (vb["scaling_factor"], vb["shift_factor"])
    assert torch.equal(load_file(src / "ae.safetensors")["decoder.conv_out.weight"],
                       load_file(out / "ae.safetensors")["decoder.conv_out.weight"])
    before = sorted(p.name for p in work.iterdir())
    with pytest.raises(SystemExit):
        T.main(["--work", str(work), "--init-from", str(src), "--tune-steps", "2"])
    assert "is not empty" in capsys.readouterr().err and sorted(p.name for p in work.iterdir()) == before
    T.main(["--work", str(work), "--tune-steps", "2", "--batch", "2", "--object-weight", "4", "--out", str(out)])
    c = load_file(out / "flux1-schnell.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the tune trained on from the repository's DiT
    assert (work / "cover.safetensors").exists()         # ... with the object weights


def test_init_from_refuses_what_it_cannot_use(smoke, tmp_path, capsys):
    """A folder without the repository's files, or with a DiT of other shapes, is refused in one line and
    nothing is written."""
    import shutil

    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(smoke / "repo-final", bad)
    (bad / "ae.safetensors").unlink()
    with pytest.raises(SystemExit):
        T.main(["--work", str(tmp_path / "w"), "--init-from", str(bad)])
    assert "(no ae.safetensors)" in capsys.readouterr().err and not (tmp_path / "w").exists()
    shutil.copy(smoke / "repo-final" / "ae.safetensors", bad / "ae.safetensors")
    sd = load_file(bad / "flux1-schnell.safetensors")
    sd["img_in.weight"] = sd["img_in.weight"][:, :32].contiguous()
    save_file(sd, str(bad / "flux1-schnell.safetensors"))
    with pytest.raises(SystemExit):
        T.main(["--work", str(tmp_path / "w"), "--init-from", str(bad)])
    assert "not a DiT of this script's shapes" in capsys.readouterr().err and not (tmp_path / "w").exists()
