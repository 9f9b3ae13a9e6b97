import math

import pytest
import torch

from sdxl_core.sampling.brownian_tree import BrownianTree
from sdxl_core.sampling.noise import (
    BrownianTreeNoiseSampler,
    GaussianNoiseSampler,
    is_max_denoise,
    noise_scaling,
    prepare_noise,
)
from sdxl_core.sampling.schedules import SCHEDULERS, DiscreteSchedule
from tests._comfyui_reference import lift, requires_comfyui

SCHEDULE = DiscreteSchedule()


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


def _grid(scheduler="karras", steps=12):
    return SCHEDULERS[scheduler](SCHEDULE, steps)


def _dpmpp_sde_queries(sigmas):
    """The (sigma, sigma_next) pairs dpmpp_sde asks for: the midpoint in log-sigma, then the whole step."""
    queries = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if s_next > 0:
            queries += [(s, (-(-s.log() + 0.5 * (-s_next.log() + s.log()))).exp()), (s, s_next)]
    return queries


def test_brownian_tree_is_seeded_and_standard_normal():
    x = torch.zeros(64, 4, 16, 16)
    sigmas = _grid()
    a = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 1)
    b = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 1)
    for s, s_next in _dpmpp_sde_queries(sigmas):
        na, nb = a(s, s_next), b(s, s_next)
        assert torch.equal(na, nb) and na.shape == x.shape and na.dtype == sigmas.dtype
        assert na.mean().item() == pytest.approx(0.0, abs=0.02)
        assert na.std().item() == pytest.approx(1.0, abs=0.02)
    other_seed = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 2)(sigmas[0], sigmas[1])
    assert (other_seed - a(sigmas[0], sigmas[1])).abs().mean() > 0.5
    with pytest.raises(ValueError, match="two different sigmas"):
        a(sigmas[0], sigmas[0])


def test_brownian_tree_increments_add_up_and_correlate_like_brownian_motion():
    # W(c) - W(a) = (W(b) - W(a)) + (W(c) - W(b)), and increments over overlapping intervals are correlated as
    # Brownian motion demands: corr = sqrt(overlap ratio); disjoint ones are independent.
    tree = BrownianTree(0.5, 5.0, (200_000,), entropy=3)
    a, b, c = 1.0, 2.5, 4.0
    first, second, whole = tree.increment(a, b), tree.increment(b, c), tree.increment(a, c)
    assert torch.allclose(first + second, whole, atol=1e-5)
    assert whole.var().item() == pytest.approx(c - a, rel=0.02)
    corr = torch.corrcoef(torch.stack([first, whole]))[0, 1].item()
    assert corr == pytest.approx(math.sqrt((b - a) / (c - a)), abs=0.01)
    assert torch.corrcoef(torch.stack([first, second]))[0, 1].item() == pytest.approx(0.0, abs=0.01)


def test_brownian_tree_values_depend_neither_on_query_order_nor_on_what_is_kept():
    sigmas = _grid("normal", 9)
    queries = [(float(lo), float(hi)) for hi, lo in _dpmpp_sde_queries(sigmas)]
    forward = BrownianTree(float(sigmas[-2]), float(sigmas[0]), (2, 3, 4), entropy=11)
    expected = [forward.increment(lo, hi) for lo, hi in queries]
    backward = BrownianTree(float(sigmas[-2]), float(sigmas[0]), (2, 3, 4), entropy=11)
    for (lo, hi), value in reversed(list(zip(queries, expected))):
        assert torch.equal(backward.increment(lo, hi), value)
        fresh = BrownianTree(float(sigmas[-2]), float(sigmas[0]), (2, 3, 4), entropy=11)  # nothing kept
        assert torch.equal(fresh.increment(lo, hi), value)
    # Handing out a value must not let the caller corrupt what the tree keeps: the whole range (the root) and its
    # left half (a kept bridge draw) are single pieces.
    t0, t1 = float(sigmas[-2]), float(sigmas[0])
    for lo, hi in ((t0, t1), (t0, round(0.5 * (t0 + t1), 6))):
        before = forward.increment(lo, hi)
        forward.increment(lo, hi).fill_(0.0)
        assert torch.equal(forward.increment(lo, hi), before) and before.abs().sum() > 0


def test_brownian_noise_sign_follows_the_query_direction():
    x = torch.zeros(1, 4, 8, 8)
    sigmas = _grid()
    down = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 5)
    # k-diffusion sorts both the range and each query and flips the sign for each swap.
    swapped_range = BrownianTreeNoiseSampler(x, sigmas[0], sigmas[-2], 5)
    for s, s_next in _dpmpp_sde_queries(sigmas):
        assert torch.equal(down(s_next, s), -down(s, s_next))
        assert torch.equal(swapped_range(s, s_next), -down(s, s_next))


def test_brownian_noise_batch_seeds():
    x = torch.zeros(2, 4, 8, 8)
    sigmas = _grid()
    one_tree = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 7)(sigmas[0], sigmas[1])
    assert (one_tree[0] - one_tree[1]).abs().mean() > 0.5  # one tree over the batch: items differ
    per_item = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], [7, 9])(sigmas[0], sigmas[1])
    alone = BrownianTreeNoiseSampler(x[:1], sigmas[-2], sigmas[0], 9)(sigmas[0], sigmas[1])
    assert torch.equal(per_item[1:], alone)
    with pytest.raises(ValueError, match="one seed per batch item expected"):
        BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], [7])


def test_brownian_tree_rejects_bad_queries():
    tree = BrownianTree(0.03, 14.6, (3,), entropy=1)
    with pytest.raises(ValueError, match="outside the tree's range"):
        tree.increment(0.01, 1.0)
    with pytest.raises(ValueError, match="less than the tree's resolution"):
        tree.increment(1.0000001, 1.0000003)
    with pytest.raises(ValueError, match="ta <= tb"):
        tree.increment(2.0, 1.0)
    with pytest.raises(ValueError, match="non-negative int"):
        BrownianTree(0.03, 14.6, (3,), entropy=-1)
    with pytest.raises(ValueError, match="t0 <= t1"):
        BrownianTree(2.0, 1.0, (3,), entropy=1)
    assert torch.equal(tree.increment(1.0, 1.0), torch.zeros(3))
    # Float32 query times just outside a float64 range are clamped, as torchsde clamps them.
    assert torch.equal(tree.increment(14.6 + 1e-7, 14.6 + 1e-7), torch.zeros(3))


# torchsde warns about the float32 query times just past its range ends, which it clamps (as we do).
IGNORE_TORCHSDE_CLAMP_WARNING = pytest.mark.filterwarnings("ignore:Should have:UserWarning")


@IGNORE_TORCHSDE_CLAMP_WARNING
@pytest.mark.parametrize("seed", [0, 42, 0xFFFFFFFFFFFFFFFF])
@pytest.mark.parametrize("scheduler", ["karras", "normal", "simple"])
def test_brownian_tree_bit_equal_to_torchsde(seed, scheduler):
    torchsde = pytest.importorskip("torchsde")
    sigmas = _grid(scheduler, 15)
    t0, t1 = sigmas[-2], sigmas[0]
    shape = (2, 4, 8, 8)
    reference = torchsde.BrownianTree(t0, torch.zeros(shape), t1, entropy=seed)
    ours = BrownianTree(float(t0), float(t1), shape, entropy=seed)
    queries = [(float(lo), float(hi)) for hi, lo in _dpmpp_sde_queries(sigmas)]
    queries += [(float(t0), float(t1)), (float(sigmas[5]), float(sigmas[1]))]
    generator = torch.Generator().manual_seed(seed % 2**32)
    order = torch.randperm(len(queries), generator=generator).tolist()  # any order, the same path
    for k in list(range(len(queries))) + order:
        lo, hi = queries[k]
        assert torch.equal(ours.increment(lo, hi), reference(lo, hi)), (k, lo, hi)


@IGNORE_TORCHSDE_CLAMP_WARNING
def test_brownian_tree_bit_equal_to_torchsde_in_float64_and_half():
    torchsde = pytest.importorskip("torchsde")
    for dtype in (torch.float64, torch.float16):
        reference = torchsde.BrownianTree(0.1, torch.zeros(5, 7, dtype=dtype), 3.0, entropy=8)
        ours = BrownianTree(0.1, 3.0, (5, 7), entropy=8, dtype=dtype)
        for lo, hi in ((0.1, 3.0), (0.25, 0.5), (1.123456, 2.654321), (0.3, 2.9)):
            assert torch.equal(ours.increment(lo, hi), reference(lo, hi)), (dtype, lo, hi)


@IGNORE_TORCHSDE_CLAMP_WARNING
@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("sigma_dtype", [torch.float32, torch.float64])
def test_brownian_noise_sampler_bit_equal_to_comfyui(sigma_dtype):
    pytest.importorskip("torchsde")
    from tests._comfyui_reference import load_modules

    reference = load_modules().sampling.BrownianTreeNoiseSampler
    sigmas = _grid("karras", 20).to(sigma_dtype)
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    x = torch.zeros(2, 4, 16, 16)
    for seed in (0, 123456789, [3, 4]):
        theirs = reference(x, sigma_min, sigma_max, seed=seed, cpu=True)
        ours = BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed)
        for s, s_next in _dpmpp_sde_queries(sigmas):
            expected = theirs(s, s_next)
            got = ours(s, s_next)
            assert got.dtype == expected.dtype and torch.equal(got, expected), (seed, float(s), float(s_next))


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


def test_a_numpy_seed_is_one_seed_like_an_int():
    import numpy

    from sdxl_core.sampling.noise import BrownianTreeNoiseSampler

    x = torch.zeros(2, 4, 8, 8)
    plain = BrownianTreeNoiseSampler(x, 0.0292, 14.6146, 5)(torch.tensor(14.6146), torch.tensor(7.0))
    from_numpy = BrownianTreeNoiseSampler(x, 0.0292, 14.6146, numpy.int64(5))(torch.tensor(14.6146),
                                                                              torch.tensor(7.0))
    assert torch.equal(plain, from_numpy)
