import math

import pytest
import torch

from sdxl_core.noise import (
    BrownianNoiseSampler,
    GaussianNoiseSampler,
    is_max_denoise,
    noise_scaling,
    prepare_noise,
)
from sdxl_core.schedules import SCHEDULERS, DiscreteEpsSchedule
from tests._comfyui_reference import lift, requires_comfyui

SCHEDULE = DiscreteEpsSchedule()


def test_prepare_noise_is_comfyuis_manual_seed_stream():
    latent = torch.zeros(2, 4, 8, 8)
    state = torch.get_rng_state()
    noise = prepare_noise(latent, 1234)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    torch.manual_seed(1234)  # what ComfyUI does
    assert torch.equal(noise, torch.randn(2, 4, 8, 8))
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(prepare_noise((2, 4, 8, 8), 1234), noise)
    assert torch.equal(prepare_noise(latent, 1234), noise)
    assert not torch.equal(prepare_noise(latent, 1235), noise)
    assert torch.equal(latent, torch.zeros(2, 4, 8, 8))


def test_prepare_noise_follows_latent_dtype_and_large_seeds():
    assert prepare_noise(torch.zeros(1, 4, 4, 4, dtype=torch.float16), 3).dtype == torch.float16
    big = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seed widget maximum
    torch.manual_seed(big)
    assert torch.equal(prepare_noise((1, 4, 4, 4), big), torch.randn(1, 4, 4, 4))


def test_batch_index_picks_single_item_draws():
    torch.manual_seed(5)
    draws = [torch.randn(1, 4, 8, 8) for _ in range(4)]
    noise = prepare_noise(torch.zeros(3, 4, 8, 8), 5, batch_index=[3, 1, 3])
    assert torch.equal(noise, torch.cat([draws[3], draws[1], draws[3]]))
    with pytest.raises(ValueError, match="one non-negative index per latent"):
        prepare_noise(torch.zeros(2, 4, 8, 8), 5, batch_index=[0])
    with pytest.raises(ValueError, match="latent shape"):
        prepare_noise((4,), 5)


def test_noise_scaling_max_denoise_and_partial():
    noise = torch.full((1, 4, 2, 2), 2.0)
    latent = torch.full((1, 4, 2, 2), 0.5)
    sigma = torch.tensor(3.0)
    assert torch.allclose(noise_scaling(sigma, noise, latent, max_denoise=True), 2.0 * math.sqrt(10.0) + latent)
    assert torch.equal(noise_scaling(sigma, noise, latent, max_denoise=False), 2.0 * 3.0 + latent)
    assert torch.equal(noise, torch.full((1, 4, 2, 2), 2.0))


def test_max_denoise_detects_a_start_at_sigma_max():
    full = SCHEDULERS["normal"](SCHEDULE, 20)
    assert is_max_denoise(full, SCHEDULE.sigma_max)
    assert is_max_denoise(SCHEDULERS["karras"](SCHEDULE, 20), SCHEDULE.sigma_max)  # 14.614643 vs 14.614641
    assert not is_max_denoise(full[5:], SCHEDULE.sigma_max)
    assert is_max_denoise(torch.tensor([20.0, 0.0]), SCHEDULE.sigma_max)


def test_gaussian_noise_sampler_continues_one_seeded_stream():
    x = torch.zeros(2, 4, 4, 4)
    sampler = GaussianNoiseSampler(x, 11)
    generator = torch.Generator().manual_seed(11)
    for _ in range(3):
        assert torch.equal(sampler(torch.tensor(2.0), torch.tensor(1.0)), torch.randn(x.shape, generator=generator))


def test_brownian_noise_sampler_is_seeded_and_standard_normal():
    x = torch.zeros(64, 4, 16, 16)
    a = BrownianNoiseSampler(x, 1)
    b = BrownianNoiseSampler(x, 1)
    sigmas = SCHEDULERS["karras"](SCHEDULE, 10)
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        na, nb = a(s, s_next), b(s, s_next)
        assert torch.equal(na, nb) and na.shape == x.shape and na.dtype == x.dtype
        assert na.mean().item() == pytest.approx(0.0, abs=0.02)
        assert na.std().item() == pytest.approx(1.0, abs=0.02)
    other_seed = BrownianNoiseSampler(x, 2)(sigmas[0], sigmas[1])
    assert not torch.equal(other_seed, BrownianNoiseSampler(x, 1)(sigmas[0], sigmas[1]))
    with pytest.raises(ValueError, match="two different sigmas"):
        a(sigmas[0], sigmas[0])


def test_brownian_increments_are_consistent_across_nested_intervals():
    # W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)) whatever order the points were first asked for, and increments
    # over overlapping intervals are correlated as Brownian motion demands: corr = sqrt(overlap ratio).
    x = torch.zeros(200_000)
    sampler = BrownianNoiseSampler(x, 3)
    a, b, c = 4.0, 2.5, 1.0
    whole = sampler(torch.tensor(a), torch.tensor(c)) * math.sqrt(a - c)
    first = sampler(torch.tensor(a), torch.tensor(b)) * math.sqrt(a - b)
    second = sampler(torch.tensor(b), torch.tensor(c)) * math.sqrt(b - c)
    assert torch.allclose(first + second, whole, atol=1e-5)
    corr = torch.corrcoef(torch.stack([first, whole]))[0, 1].item()
    assert corr == pytest.approx(math.sqrt((a - b) / (a - c)), abs=0.01)
    assert torch.corrcoef(torch.stack([first, second]))[0, 1].item() == pytest.approx(0.0, abs=0.01)


@requires_comfyui
@pytest.mark.comfyui
def test_prepare_noise_and_scaling_bit_equal_to_comfyui():
    functions = lift("comfy/sample.py", "prepare_noise")
    latent = torch.zeros(3, 4, 16, 16)
    assert torch.equal(functions["prepare_noise"](latent, 77), prepare_noise(latent, 77))
    assert torch.equal(functions["prepare_noise"](latent, 77, [2, 0, 2]), prepare_noise(latent, 77, [2, 0, 2]))

    from tests._comfyui_reference import load_modules

    eps = load_modules().model_sampling.EPS()
    noise, image = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for sigma, max_denoise in ((SCHEDULE.sigma_max, True), (torch.tensor(3.3), False)):
        expected = eps.noise_scaling(sigma, noise.clone(), image, max_denoise=max_denoise)
        assert torch.equal(noise_scaling(sigma, noise, image, max_denoise), expected)
