"""Sampler pieces against diffusers' FlowMatchEulerDiscreteScheduler and FluxPipeline helpers."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from minidit import sampling

FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


@pytest.mark.parametrize("height,width", [(1024, 1024), (512, 512), (768, 1360), (256, 2048), (64, 48)])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_dev_schedule_equals_diffusers(height, width, steps):
    seq = (height // 16) * (width // 16)
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sampling.get_schedule(steps, seq, shift=True)
    assert ours.shape == (steps + 1,) and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours, sched.sigmas, atol=1e-6, rtol=0)
    assert sampling.calculate_mu(seq) == pytest.approx(mu)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_schedule_equals_diffusers(steps):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    torch.testing.assert_close(sampling.get_schedule(steps, 4096, shift=False), sched.sigmas, atol=1e-6, rtol=0)


def test_mu_endpoints_and_shift_direction():
    assert sampling.calculate_mu(256) == pytest.approx(0.5)
    assert sampling.calculate_mu(4096) == pytest.approx(1.15)
    plain = sampling.get_schedule(10, 4096, shift=False)
    shifted = sampling.get_schedule(10, 4096, shift=True)
    assert (shifted[1:-1] > plain[1:-1]).all()  # positive mu keeps more noise
    reversed_ = sampling.get_schedule(10, 4096, mu=-sampling.calculate_mu(4096))
    assert (reversed_[1:-1] < plain[1:-1]).all()


@pytest.mark.parametrize("height,width", [(64, 48), (128, 32)])
def test_pack_unpack_ids_match_diffusers(height, width):
    h, w = sampling.latent_size(height, width)
    x = torch.randn(2, 16, h, w)
    packed = sampling.pack(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, h, w), atol=0, rtol=0)
    torch.testing.assert_close(sampling.unpack(packed, height, width),
                               FluxPipeline._unpack_latents(packed, height, width, 8), atol=0, rtol=0)
    ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)
    torch.testing.assert_close(sampling.image_ids(2, height, width)[0], ids, atol=0, rtol=0)


def test_noise_is_diffusers_noise():
    """diffusers' prepare_latents with a CPU generator: same seed -> same packed noise."""
    height, width = 64, 96
    pipe = FluxPipeline.__new__(FluxPipeline)
    pipe.vae_scale_factor = 8
    lat, _ = FluxPipeline.prepare_latents(pipe, 2, 16, height, width, torch.float32, "cpu",
                                          torch.Generator("cpu").manual_seed(42))
    assert torch.equal(sampling.noise(2, height, width, 42), lat)
    # per-image seeds: image i alone equals a batch of one with seed i
    per = sampling.noise(2, height, width, [5, 6])
    assert torch.equal(per[1:], sampling.noise(1, height, width, 6))
    assert not torch.equal(per[:1], per[1:])


@pytest.mark.parametrize("size", [(100, 64), (64, 0), (1000, 1000)])
def test_resolution_must_be_multiple_of_16(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        sampling.latent_size(*size)


def test_denoise_euler_matches_a_hand_loop():
    """With a fake velocity field v = c (constant), Euler lands at x_0 = x_1 - c exactly."""
    class Const(torch.nn.Module):
        cfg = type("C", (), {"guidance_embed": False})()

        def forward(self, img, img_ids, txt, txt_ids, t, y, guidance=None):
            return torch.ones_like(img) * 0.5

    x = torch.randn(1, 4, 64)
    out = sampling.denoise(Const(), x, None, None, None, None, sampling.get_schedule(7, 4, shift=True), None)
    torch.testing.assert_close(out, x - 0.5)
