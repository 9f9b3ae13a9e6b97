import math

import numpy
import pytest
import torch

from sdxl_core.sampling.schedules import (
    SCHEDULERS,
    DiscreteSchedule,
    beta_ppf,
    ksampler_sigmas,
    regularized_incomplete_beta,
    scheduler_sigmas,
    sigmas_for_range,
)
from tests._comfyui_reference import lift, load_modules, model_sampling_discrete, requires_comfyui

SCHEDULE = DiscreteSchedule()


def _hand_sigma(t: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t) with scaled-linear betas, straight from docs/sampling.md in float64."""
    start, end = math.sqrt(0.00085), math.sqrt(0.012)
    abar = 1.0
    for i in range(t + 1):
        abar *= 1.0 - (start + (end - start) * i / 999) ** 2
    return math.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("t, expected", [(0, 0.029167), (199, 0.569285), (200, 0.571666), (999, 14.614641)])
def test_sigma_table_values(t, expected):
    assert SCHEDULE.sigmas[t].item() == pytest.approx(expected, abs=1e-6)
    assert SCHEDULE.sigmas[t].item() == pytest.approx(_hand_sigma(t), rel=1e-6)


def test_schedule_is_computed_in_float64_and_stored_float32():
    assert SCHEDULE.alphas_cumprod.dtype == torch.float64
    assert SCHEDULE.sigmas.dtype == torch.float32 and SCHEDULE.sigmas.shape == (1000,)
    # diffusers' float32 betas give a sigma up to 1.3e-5 off; the float64 path matches the hand value to fp32 ulp.
    hand = torch.tensor([_hand_sigma(t) for t in (0, 500, 999)], dtype=torch.float64)
    assert torch.equal(SCHEDULE.sigmas[[0, 500, 999]], hand.float())
    assert torch.all(SCHEDULE.sigmas[1:] > SCHEDULE.sigmas[:-1])


def test_sigma_to_timestep_is_nearest_in_log_sigma():
    assert SCHEDULE.timestep(SCHEDULE.sigmas[[0, 200, 999]]).tolist() == [0, 200, 999]
    log_mid = (SCHEDULE.log_sigmas[199].double() + SCHEDULE.log_sigmas[200].double()) / 2
    just_below, just_above = math.exp(log_mid - 1e-4), math.exp(log_mid + 1e-4)
    assert SCHEDULE.timestep(torch.tensor([just_below, just_above])).tolist() == [199, 200]
    # The arithmetic midpoint in sigma lies above the log midpoint, so the log rule maps it to the upper index.
    arithmetic_mid = (SCHEDULE.sigmas[199] + SCHEDULE.sigmas[200]) / 2
    assert SCHEDULE.timestep(arithmetic_mid).item() == 200
    # Out-of-range sigmas clamp to the ends.
    assert SCHEDULE.timestep(torch.tensor([1e-4, 1e3])).tolist() == [0, 999]


def test_timestep_to_sigma_interpolates_log_sigma():
    assert SCHEDULE.sigma(torch.tensor(200.0)).item() == pytest.approx(0.571666, abs=1e-6)
    expected = math.exp((math.log(_hand_sigma(199)) + math.log(_hand_sigma(200))) / 2)
    assert SCHEDULE.sigma(torch.tensor(199.5)).item() == pytest.approx(expected, rel=1e-6)
    assert SCHEDULE.sigma(torch.tensor([-5.0, 5000.0])).tolist() == pytest.approx([0.029167, 14.614641], abs=2e-6)
    assert SCHEDULE.percent_to_sigma(0.0) > 1e8 and SCHEDULE.percent_to_sigma(1.0) == 0.0
    assert SCHEDULE.percent_to_sigma(0.8) == pytest.approx(SCHEDULE.sigma(torch.tensor(199.8)).item())


def test_every_scheduler_ends_in_zero_and_descends():
    for name, scheduler in SCHEDULERS.items():
        for steps in (1, 2, 7, 30, 50):
            sigmas = scheduler(SCHEDULE, steps)
            assert sigmas.dtype == torch.float32, name
            assert sigmas[-1].item() == 0.0, name
            assert torch.all(sigmas[:-1] > sigmas[1:]), (name, steps)
            if name not in ("ddim_uniform", "beta"):
                assert len(sigmas) == steps + 1, (name, steps)


def test_simple_grid_n50_is_every_20th_training_sigma():
    sigmas = SCHEDULERS["simple"](SCHEDULE, 50)
    indices = [999 - 20 * k for k in range(50)]  # 999, 979, ..., 19 (docs/sampling.md, schedulers)
    assert torch.equal(sigmas[:-1], SCHEDULE.sigmas[indices])


def test_normal_grid_n50_is_log_interpolated_linspace_in_t():
    sigmas = SCHEDULERS["normal"](SCHEDULE, 50)
    assert sigmas[0].item() == pytest.approx(14.614641, rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.029167, rel=1e-5)
    t = 999 - 999 * 7 / 49  # the 8th point of linspace(999, 0, 50)
    low = math.floor(t)
    w = t - low
    expected = math.exp((1 - w) * math.log(_hand_sigma(low)) + w * math.log(_hand_sigma(low + 1)))
    assert sigmas[7].item() == pytest.approx(expected, rel=2e-6)


def test_sgm_uniform_drops_the_last_of_steps_plus_one_points():
    sigmas = SCHEDULERS["sgm_uniform"](SCHEDULE, 50)
    t = 999 - 999 * 49 / 50
    low = math.floor(t)
    w = t - low
    expected = math.exp((1 - w) * math.log(_hand_sigma(low)) + w * math.log(_hand_sigma(low + 1)))
    assert sigmas[49].item() == pytest.approx(expected, rel=2e-6)


def test_karras_grid_endpoints_and_rho_spacing():
    sigmas = SCHEDULERS["karras"](SCHEDULE, 50)
    assert sigmas[0].item() == pytest.approx(14.614641, rel=1e-6)
    assert sigmas[-2].item() == pytest.approx(0.029167, rel=1e-5)
    pinned = SCHEDULERS["karras"](SCHEDULE, 10)
    assert pinned.tolist() == pytest.approx([14.614643, 9.102929, 5.478392, 3.168605, 1.749418, 0.914073, 0.446918,
                                             0.201398, 0.081910, 0.029167, 0.0], abs=2e-6)
    inv_rho = sigmas[:-1].double() ** (1 / 7)
    assert torch.allclose(inv_rho[1:] - inv_rho[:-1], (inv_rho[1] - inv_rho[0]).expand(49), rtol=1e-4)


def test_exponential_grid_is_geometric():
    sigmas = SCHEDULERS["exponential"](SCHEDULE, 20)
    ratios = sigmas[1:-1] / sigmas[:-2]
    expected = (0.029167158529162407 / 14.614641189575195) ** (1 / 19)
    assert sigmas[[0, 1, 18, 19]].tolist() == pytest.approx([14.614640, 10.536307, 0.040457, 0.029167], abs=2e-6)
    assert torch.allclose(ratios, torch.full_like(ratios, expected), rtol=1e-5)


def test_ddim_uniform_grid_pinned():
    sigmas = SCHEDULERS["ddim_uniform"](SCHEDULE, 50)
    assert len(sigmas) == 51
    assert torch.equal(sigmas[:-1], SCHEDULE.sigmas[list(range(981, 0, -20))])
    # 1000 is not a multiple of 30: ComfyUI's stride 33 yields 31 sigmas before the 0.
    assert len(SCHEDULERS["ddim_uniform"](SCHEDULE, 30)) == 32


def test_beta_grid_pinned():
    sigmas = SCHEDULERS["beta"](SCHEDULE, 10)
    expected = [14.614641, 11.542770, 7.371844, 4.372802, 2.615236, 1.618279, 1.027329, 0.654885, 0.395510, 0.199059,
                0.0]
    assert sigmas.tolist() == pytest.approx(expected, abs=2e-6)


def test_beta_inverse_cdf_pinned_and_inverts():
    assert beta_ppf(0.5, 0.6, 0.6) == 0.5
    assert beta_ppf(0.25, 0.6, 0.6) == pytest.approx(0.17568038, abs=1e-8)
    assert beta_ppf(0.75, 0.6, 0.6) == pytest.approx(0.82431962, abs=1e-8)
    assert beta_ppf(0.3, 2.0, 5.0) == pytest.approx(0.181803471318949, abs=1e-12)  # scipy.stats.beta.ppf(0.3, 2, 5)
    for q in (0.01, 0.2, 0.9, 0.999):
        assert regularized_incomplete_beta(beta_ppf(q, 0.6, 0.6), 0.6, 0.6) == pytest.approx(q, abs=1e-13)
    # I_x(1, 1) = x and I_x(2, 1) = x^2 in closed form.
    assert regularized_incomplete_beta(0.3, 1.0, 1.0) == pytest.approx(0.3, abs=1e-15)
    assert regularized_incomplete_beta(0.3, 2.0, 1.0) == pytest.approx(0.09, abs=1e-15)
    with pytest.raises(ValueError, match="quantile"):
        beta_ppf(1.5, 0.6, 0.6)


def test_beta_grid_matches_scipy_formula_for_many_step_counts():
    scipy_stats = pytest.importorskip("scipy.stats")
    for steps in [*range(1, 41), 64, 99, 150]:
        quantiles = 1 - numpy.linspace(0, 1, steps, endpoint=False)
        ts = numpy.rint(scipy_stats.beta.ppf(quantiles, 0.6, 0.6) * 999)
        keep = [int(t) for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
        expected = torch.cat([SCHEDULE.sigmas[keep], torch.zeros(1)])
        assert torch.equal(SCHEDULERS["beta"](SCHEDULE, steps), expected), steps


def test_unknown_scheduler_and_bad_steps_are_refused():
    with pytest.raises(ValueError, match="unknown scheduler 'linear'"):
        scheduler_sigmas(SCHEDULE, "linear", 10)
    with pytest.raises(ValueError, match="positive int"):
        scheduler_sigmas(SCHEDULE, "normal", 0)


def test_dpm_2_grid_discards_the_penultimate_sigma():
    plain = scheduler_sigmas(SCHEDULE, "karras", 11)
    assert torch.equal(ksampler_sigmas(SCHEDULE, "karras", "dpm_2", 10), torch.cat([plain[:-2], plain[-1:]]))
    assert torch.equal(ksampler_sigmas(SCHEDULE, "karras", "euler", 10), scheduler_sigmas(SCHEDULE, "karras", 10))


def test_denoise_takes_the_tail_of_a_longer_grid():
    # 20 steps at denoise 0.5 run the last 20 of a 40-step grid.
    tail = ksampler_sigmas(SCHEDULE, "normal", "euler", 20, denoise=0.5)
    assert torch.equal(tail, scheduler_sigmas(SCHEDULE, "normal", 40)[-21:])
    # int(steps / denoise) truncates: 10 / 0.3 = 33.3 -> a 33-step grid.
    assert torch.equal(ksampler_sigmas(SCHEDULE, "simple", "euler", 10, denoise=0.3),
                       scheduler_sigmas(SCHEDULE, "simple", 33)[-11:])
    assert ksampler_sigmas(SCHEDULE, "normal", "euler", 20, denoise=0.0).numel() == 0
    assert torch.equal(ksampler_sigmas(SCHEDULE, "normal", "euler", 20, denoise=0.99995),
                       scheduler_sigmas(SCHEDULE, "normal", 20))


def test_step_range_base_refiner_handoff():
    full = scheduler_sigmas(SCHEDULE, "normal", 25)
    base = sigmas_for_range(full, 0, 20, leftover_noise=True)
    refiner = sigmas_for_range(full, 20, 10000, leftover_noise=False)
    assert torch.equal(base, full[:21])
    assert torch.equal(refiner, full[20:])
    assert base[-1] == refiner[0] > 0  # the refiner starts where the base stopped, noise left in
    assert full[20] > 0  # caller's grid untouched


def test_step_range_end_without_leftover_noise_zeroes_last_sigma():
    full = scheduler_sigmas(SCHEDULE, "normal", 10)
    snapshot = full.clone()
    part = sigmas_for_range(full, None, 6, leftover_noise=False)
    assert part.tolist() == full[:6].tolist() + [0.0]
    assert torch.equal(full, snapshot)
    # end beyond the grid: nothing truncated and nothing zeroed (ComfyUI only acts when end < len - 1).
    assert torch.equal(sigmas_for_range(full, None, 10, leftover_noise=True), full)


def test_step_range_start_past_the_end_runs_nothing():
    full = scheduler_sigmas(SCHEDULE, "normal", 10)
    assert sigmas_for_range(full, 10, None).numel() == 0
    assert sigmas_for_range(full, 9, None).tolist() == full[9:].tolist()
    assert sigmas_for_range(full, 5, 5).numel() == 0
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        sigmas_for_range(full, -1, None)


@requires_comfyui
@pytest.mark.comfyui
def test_schedule_and_schedulers_bit_equal_to_comfyui():
    reference = model_sampling_discrete()
    assert torch.equal(reference.sigmas, SCHEDULE.sigmas)
    assert torch.equal(reference.log_sigmas, SCHEDULE.log_sigmas)
    probe = torch.tensor([0.02, 0.5, 0.5704, 3.3, 14.0, 20.0])
    assert torch.equal(reference.timestep(probe), SCHEDULE.timestep(probe))
    fractional = torch.tensor([0.0, 0.25, 199.5, 640.125, 999.0])
    assert torch.equal(reference.sigma(fractional), SCHEDULE.sigma(fractional))

    import scipy.stats

    k_sampling = load_modules().sampling

    functions = lift("comfy/samplers.py", "simple_scheduler", "ddim_scheduler", "normal_scheduler", "beta_scheduler",
                     "linear_quadratic_schedule", "kl_optimal_scheduler", namespace={"scipy": scipy})
    comfy_schedulers = {
        "simple": functions["simple_scheduler"],
        "ddim_uniform": functions["ddim_scheduler"],
        "normal": functions["normal_scheduler"],
        "sgm_uniform": lambda ms, n: functions["normal_scheduler"](ms, n, sgm=True),
        "beta": functions["beta_scheduler"],
        "karras": lambda ms, n: k_sampling.get_sigmas_karras(n, float(ms.sigma_min), float(ms.sigma_max)),
        "exponential": lambda ms, n: k_sampling.get_sigmas_exponential(n, float(ms.sigma_min), float(ms.sigma_max)),
        "linear_quadratic": functions["linear_quadratic_schedule"],
        "kl_optimal": lambda ms, n: functions["kl_optimal_scheduler"](n, float(ms.sigma_min), float(ms.sigma_max)),
    }
    assert set(comfy_schedulers) == set(SCHEDULERS)
    for name, comfy_scheduler in comfy_schedulers.items():
        # kl_optimal with one step divides by zero in ComfyUI (a NaN grid); ours is checked by hand below.
        for steps in (1, 2, 3, 10, 20, 25, 30, 50, 77) if name != "kl_optimal" else (2, 3, 10, 20, 25, 30, 50, 77):
            assert torch.equal(comfy_scheduler(reference, steps), SCHEDULERS[name](SCHEDULE, steps)), (name, steps)


def test_timestep_lookup_stays_on_the_sigma_device():
    """The nearest-timestep lookup runs where sigma lives: a round trip through the CPU would make every sampling
    step on a GPU wait for the previous one to finish. The meta device stands in for a GPU here: it has no data,
    so any copy to the CPU fails."""
    schedule = DiscreteSchedule()
    on_meta = schedule.timestep(torch.tensor([14.6, 0.03], device="meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2,)
    assert schedule.timestep(torch.tensor([14.6146, 0.0292])).tolist() == [999, 0]


def test_scheduler_menu_is_comfyuis():
    assert list(SCHEDULERS) == ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                                "linear_quadratic", "kl_optimal"]


def test_linear_quadratic_and_kl_optimal_shapes():
    sigma_max, sigma_min = SCHEDULE.sigma_max.item(), SCHEDULE.sigma_min.item()
    lq = scheduler_sigmas(SCHEDULE, "linear_quadratic", 10)
    assert lq.shape == (11,) and lq[0].item() == pytest.approx(sigma_max) and lq[-1].item() == 0.0
    # The first half falls linearly by threshold_noise / 5 of sigma_max per step.
    assert torch.allclose(lq[:6], torch.tensor([sigma_max * (1 - i * 0.025 / 5) for i in range(6)]), rtol=1e-6)
    assert torch.all(lq[1:] < lq[:-1])
    kl = scheduler_sigmas(SCHEDULE, "kl_optimal", 4)
    angles = torch.atan(kl[:-1].double())
    assert kl[0].item() == pytest.approx(sigma_max, rel=1e-6) and kl[3].item() == pytest.approx(sigma_min, rel=1e-5)
    assert torch.allclose(angles[1:] - angles[:-1], (angles[1] - angles[0]).expand(3), rtol=1e-5)
    assert scheduler_sigmas(SCHEDULE, "kl_optimal", 1).tolist() == [pytest.approx(sigma_max), 0.0]
