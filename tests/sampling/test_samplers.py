import math

import pytest
import torch

from sdxl_core.sampling.noise import BrownianTreeNoiseSampler
from sdxl_core.sampling.samplers import (
    COMFYUI_SAMPLER_ORDER,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    NoiseKind,
    SamplingCancelled,
    get_sampler,
    integrate,
    run_sampler,
)
from sdxl_core.sampling.samplers.dpmpp import sample_dpmpp_2m
from sdxl_core.sampling.schedules import SCHEDULERS, DiscreteSchedule, ksampler_sigmas
from tests._comfyui_reference import (
    GuidedModelStub,
    KDiffusionModelStub,
    load_modules,
    model_sampling_eps,
    requires_comfyui,
)
from tests._host_reads import HostReads

SCHEDULE = DiscreteSchedule()
DETERMINISTIC = sorted(set(SAMPLERS) - STOCHASTIC_SAMPLERS)

# Toy data: every latent element i.i.d. N(MU, VAR). Its ideal denoiser and probability-flow ODE are known exactly.
MU, VAR = 0.3, 0.25


def gaussian_denoiser(x, sigma):
    """E[x0 | x0 + sigma * n = x] for x0 ~ N(MU, VAR)."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    return MU + VAR / (VAR + s**2) * (x - MU)


def gaussian_eps(x_in, sigma):
    """The same data as an eps model on the VP input x_in = x / sqrt(sigma^2 + 1)."""
    x = x_in * (sigma**2 + 1) ** 0.5
    return (x - (MU + VAR / (VAR + sigma**2) * (x - MU))) / sigma


def _start(steps, scheduler="karras", dtype=torch.float64, shape=(4, 4, 16, 16), seed=0):
    sigmas = SCHEDULERS[scheduler](SCHEDULE, steps).to(dtype)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return noise * sigmas[0], sigmas


def test_registry_has_every_comfyui_name_in_comfyuis_order():
    assert tuple(SAMPLERS) == COMFYUI_SAMPLER_ORDER and len(SAMPLERS) == 42
    assert get_sampler("dpmpp_2m").fn is sample_dpmpp_2m
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_3m'"):
        get_sampler("dpmpp_3m")


def test_single_euler_step_by_hand():
    # x0 = 0.5 x at every sigma: d = (1 - 0.5) / 2 = 0.25, x' = 1 + 0.25 * (1 - 2) = 0.75.
    out = integrate("euler", lambda x, s: 0.5 * x, torch.ones(1, 1, 1, 1), torch.tensor([2.0, 1.0]))
    assert out.item() == pytest.approx(0.75, abs=1e-7)


def test_single_heun_step_by_hand():
    # Euler predictor: 0.75 at sigma 1; there d_2 = (0.75 - 0.375) / 1 = 0.375; x' = 1 + (0.25 + 0.375) / 2 * -1.
    out = integrate("heun", lambda x, s: 0.5 * x, torch.ones(1, 1, 1, 1), torch.tensor([2.0, 1.0]))
    assert out.item() == pytest.approx(0.6875, abs=1e-7)


def test_dpmpp_2m_steps_by_hand():
    sigmas = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
    outputs = iter([torch.full((1, 1, 1, 1), v, dtype=torch.float64) for v in (0.5, 0.2)])
    out = integrate("dpmpp_2m", lambda x, s: next(outputs), torch.ones(1, 1, 1, 1, dtype=torch.float64), sigmas)
    # Step 1 (first order): x = (2/4) * 1 + (1 - 2/4) * 0.5 = 0.75.
    # Step 2: h = h_last = ln 2, r = 1, D = 1.5 * 0.2 - 0.5 * 0.5 = 0.05; x = 0.5 * 0.75 + 0.5 * 0.05 = 0.4.
    assert out.item() == pytest.approx(0.4, abs=1e-12)


# Where a sampler stops short of sigma 0 (as ComfyUI's do): dpm_fast/dpm_adaptive at the grid's smallest positive
# sigma, UniPC at 0.001.
def _end_sigma(name, sigmas):
    return {"dpm_fast": sigmas[-2].item(), "dpm_adaptive": sigmas[-2].item(), "uni_pc": 0.001,
            "uni_pc_bh2": 0.001}.get(name, 0.0)


def exact_ode_solution(x, sigma_start, sigma_end):
    """The probability-flow ODE for Gaussian data scales x - MU by sqrt((VAR + sigma^2) / (VAR + sigma_start^2))."""
    return MU + math.sqrt((VAR + sigma_end**2) / (VAR + sigma_start**2)) * (x - MU)


# Samplers whose error falls about 4x from 10 to 40 steps (first order); heunpp2 and gradient_estimation measure so
# as ComfyUI runs them.
FIRST_ORDER = {"euler", "ddim", "euler_cfg_pp", "heunpp2", "gradient_estimation", "gradient_estimation_cfg_pp"}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(name):
    errors = []
    for steps in (10, 40):
        x, sigmas = _start(steps)
        out = integrate(name, gaussian_denoiser, x, sigmas, schedule=SCHEDULE)
        errors.append((out - exact_ode_solution(x, sigmas[0].item(), _end_sigma(name, sigmas))).abs().max().item())
    if name == "dpm_adaptive":
        # Its steps are its own (error control at rtol 0.05): the grid's length changes nothing.
        assert errors[0] == errors[1] and errors[0] < 0.05, errors
    elif name == "ipndm_v":
        # Variable-step AB4 on the Karras grid: accurate at both lengths (ComfyUI's numbers, compared below).
        assert max(errors) < 0.005, errors
    elif name in FIRST_ORDER:
        assert errors[1] < errors[0] / 2 and errors[1] < 0.1, errors
    else:
        assert errors[1] < errors[0] / 10 and errors[1] < 0.01, errors


# lcm jumps to the predicted x0 and renoises it: a consistency model's x0 is a sample, the ideal denoiser's a mean,
# so with this denoiser it under-disperses by design (checked by hand below). ComfyUI's dpmpp_2s_ancestral_cfg_pp
# updates with the midpoint's unconditional prediction against the start's x0, which shrinks the spread too
# (its numbers are ComfyUI's, compared above).
NOT_DISTRIBUTION_SAMPLERS = {"lcm", "dpmpp_2s_ancestral_cfg_pp"}


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS - NOT_DISTRIBUTION_SAMPLERS))
def test_stochastic_samplers_reach_the_data_distribution(name):
    x, sigmas = _start(40, shape=(8, 4, 32, 32))
    out = integrate(name, gaussian_denoiser, x, sigmas, seed=123, schedule=SCHEDULE)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(math.sqrt(VAR), abs=0.05)


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_stochastic_samplers_are_deterministic_per_seed(name):
    x, sigmas = _start(8, dtype=torch.float32)
    first = integrate(name, gaussian_denoiser, x, sigmas, seed=7, schedule=SCHEDULE)
    again = integrate(name, gaussian_denoiser, x, sigmas, seed=7, schedule=SCHEDULE)
    other = integrate(name, gaussian_denoiser, x, sigmas, seed=8, schedule=SCHEDULE)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="stochastic: pass seed="):
        integrate(name, gaussian_denoiser, x, sigmas, schedule=SCHEDULE)


def test_euler_ancestral_noise_is_comfyuis_seeded_generator():
    # ComfyUI's default noise sampler is a generator on x's device seeded with the KSampler seed, so on CPU the
    # first ancestral noise equals the initial noise drawn with the same seed.
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    x = torch.zeros(1, 2, 4, 4)
    expected_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(99))
    seen = []
    out = integrate("euler_ancestral", lambda x, s: torch.zeros_like(x), x, sigmas, seed=99,
                                 callback=lambda info: seen.append(info["x"]))
    # Step 1: x0 = 0, sigma_up = sqrt(1 * (4 - 1) / 4), sigma_down = 0.5, so x = 0 + noise * sigma_up.
    assert torch.allclose(seen[1], expected_noise * math.sqrt(0.75))
    assert torch.equal(out, torch.zeros_like(out))  # the last step to 0 returns the denoised value


def test_callback_and_cancel():
    x, sigmas = _start(5, dtype=torch.float32)
    seen = []
    integrate("euler", gaussian_denoiser, x, sigmas, callback=seen.append)
    assert [info["i"] for info in seen] == [0, 1, 2, 3, 4]
    assert set(seen[0]) == {"i", "total", "x", "sigma", "sigma_hat", "denoised"}
    assert {info["total"] for info in seen} == {5}
    assert seen[2]["sigma"] == sigmas[2]
    x9, sigmas9 = _start(9, dtype=torch.float32)
    calls = []

    def cancel_at_third_step():
        calls.append(None)
        return len(calls) == 3

    for name in SAMPLERS:
        calls.clear()
        # dpm_fast takes its own steps (4 of them for 9 evaluations), dpm_adaptive as many as its error allows.
        total = {"dpm_fast": " of 4", "dpm_adaptive": ""}.get(name, " of 9")
        with pytest.raises(SamplingCancelled, match=f"before step 3{total}$") as raised:
            integrate(name, gaussian_denoiser, x9, sigmas9, seed=1, schedule=SCHEDULE, cancel=cancel_at_third_step)
        assert raised.value.step == 2


def test_empty_or_single_sigma_grid_returns_input_and_inputs_are_untouched():
    x, sigmas = _start(6, dtype=torch.float32)
    snapshot = (x.clone(), sigmas.clone())
    for name in SAMPLERS:
        assert torch.equal(integrate(name, gaussian_denoiser, x, sigmas[:0], seed=1), x)
        assert torch.equal(integrate(name, gaussian_denoiser, x, sigmas[-1:], seed=1), x)
        integrate(name, gaussian_denoiser, x, sigmas, seed=1, schedule=SCHEDULE)
    assert torch.equal(x, snapshot[0]) and torch.equal(sigmas, snapshot[1])


def test_samplers_call_the_denoiser_with_x_and_one_sigma_per_item():
    """The denoiser is `denoiser(x, sigma)`: conditioning lives in the denoiser (guidance.CFGDenoiser), not in
    per-call keyword arguments, and sigma comes as one value per batch item (k-diffusion's `sigma * s_in`)."""
    seen = []

    def denoiser(*args, **kwargs):
        seen.append((len(args), kwargs, tuple(args[1].shape)))
        return gaussian_denoiser(*args)

    x, sigmas = _start(3, dtype=torch.float32)
    for name in SAMPLERS:
        seen.clear()
        integrate(name, denoiser, x, sigmas, seed=1, schedule=SCHEDULE)
        assert seen and all(call == (2, {}, (x.shape[0],)) for call in seen), name


def test_deterministic_samplers_take_no_noise_and_stochastic_ones_need_a_seed():
    """Noise is the caller's business: only samplers registered with a noise kind get one, built by `integrate`
    from the KSampler seed."""
    import inspect

    for name, spec in SAMPLERS.items():
        parameters = inspect.signature(spec.fn).parameters
        assert ("noise" in parameters) == spec.stochastic, name
        assert "seed" not in parameters, name


def test_run_sampler_scales_noise_like_comfyui():
    latent, noise = torch.full((1, 4, 4, 4), 0.5), torch.randn(1, 4, 4, 4)
    full = SCHEDULERS["normal"](SCHEDULE, 10)
    starts = []
    record = lambda info: starts.append(info["x"]) if info["i"] == 0 else None  # noqa: E731
    run_sampler("euler", gaussian_denoiser, latent, noise, full, sigma_max=SCHEDULE.sigma_max, callback=record)
    assert torch.allclose(starts[0], noise * (1 + full[0] ** 2) ** 0.5 + latent)  # starts from pure noise
    run_sampler("euler", gaussian_denoiser, latent, noise, full[4:], sigma_max=SCHEDULE.sigma_max, callback=record)
    assert torch.equal(starts[1], noise * full[4] + latent)  # img2img / refiner: latent + sigma * noise
    zeros = torch.zeros_like(noise)  # add_noise=disable: the refiner continues from the base's noisy latent
    run_sampler("euler", gaussian_denoiser, latent, zeros, full[4:], sigma_max=SCHEDULE.sigma_max, callback=record)
    assert torch.equal(starts[2], latent)
    assert run_sampler("euler", gaussian_denoiser, latent, noise, full[:0], sigma_max=SCHEDULE.sigma_max) is latent
    out = run_sampler("euler_ancestral", gaussian_denoiser, latent, noise, full, sigma_max=SCHEDULE.sigma_max, seed=3)
    again = run_sampler("euler_ancestral", gaussian_denoiser, latent, noise, full, sigma_max=SCHEDULE.sigma_max, seed=3)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="noise shape"):
        run_sampler("euler", gaussian_denoiser, latent, noise[:, :2], full, sigma_max=SCHEDULE.sigma_max)


def _diffusers_config():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon")


@pytest.mark.parametrize("scheduler", ["karras", "normal"])
def test_euler_matches_diffusers_euler_discrete(scheduler):
    from diffusers import EulerDiscreteScheduler

    x, sigmas = _start(20, scheduler=scheduler, dtype=torch.float32)
    reference = EulerDiscreteScheduler(**_diffusers_config())
    reference.set_timesteps(sigmas=sigmas.tolist())
    reference.set_begin_index(0)
    assert torch.equal(reference.sigmas, sigmas)
    sample = x
    for i, t in enumerate(reference.timesteps):
        eps = gaussian_eps(reference.scale_model_input(sample, t), sigmas[i])
        sample = reference.step(eps, t, sample).prev_sample

    def denoiser(x, s):
        s = s.view(-1, 1, 1, 1)
        return x - s * gaussian_eps(x / (s**2 + 1) ** 0.5, s)

    ours = integrate("euler", denoiser, x, sigmas)
    assert torch.allclose(ours, sample, rtol=1e-5, atol=1e-6)
    assert ((ours - sample).abs().max() / sample.abs().max()).item() < 1e-5


@pytest.mark.parametrize("scheduler", ["karras", "normal"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(scheduler):
    from diffusers import DPMSolverMultistepScheduler

    steps = 20
    x, sigmas = _start(steps, scheduler=scheduler, dtype=torch.float32)
    reference = DPMSolverMultistepScheduler(**_diffusers_config(), algorithm_type="dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero", lower_order_final=True)
    reference.set_timesteps(steps)
    # diffusers has no custom-sigma entry point for this scheduler: drive it on our grid directly.
    reference.sigmas = sigmas.clone()
    reference.timesteps = torch.arange(steps - 1, -1, -1)
    reference.set_begin_index(0)
    # diffusers' DPM-Solver works on the VP sample x / sqrt(sigma^2 + 1); the model input is that sample.
    sample = x / (sigmas[0] ** 2 + 1) ** 0.5
    for i, t in enumerate(reference.timesteps):
        sample = reference.step(gaussian_eps(sample, sigmas[i]), t, sample).prev_sample

    def denoiser(x, s):
        s = s.view(-1, 1, 1, 1)
        return x - s * gaussian_eps(x / (s**2 + 1) ** 0.5, s)

    ours = integrate("dpmpp_2m", denoiser, x, sigmas)
    assert ((ours - sample).abs().max() / sample.abs().max()).item() < 1e-5


# Where ComfyUI's arithmetic differs from ours by more than op order allows, the stated tolerance (absolute, on
# latents of order 1); every other sampler is compared with torch.equal.
COMFYUI_TOLERANCE = {
    "lms": 1e-5,  # ComfyUI integrates the multistep coefficients with scipy quad on float32 values; ours are exact
    "deis": 2e-5,  # ComfyUI's DEIS coefficients are float32 sums over 10000 points (autograd slope); ours float64
}
COMFYUI_SCHEDULERS = ["karras", "normal", "simple", "exponential", "sgm_uniform", "beta", "linear_quadratic",
                      "kl_optimal", "ddim_uniform"]


def twisted(x, sigma):
    """A non-linear denoiser, so that no step is exact by accident."""
    return gaussian_denoiser(x, sigma) + 0.05 * torch.tanh(x)


def comfyui_sample(name, model, x, sigmas, seed, **kwargs):
    """ComfyUI's sampler of that name, called as its KSAMPLER calls it (`comfy/samplers.py sampler_object`)."""
    reference = load_modules()
    extra_args = {"seed": seed}
    sigmas = sigmas.clone()  # ComfyUI's UniPC overwrites the last sigma in place
    if name in ("uni_pc", "uni_pc_bh2"):
        variant = "bh2" if name == "uni_pc_bh2" else "bh1"
        return reference.uni_pc.sample_unipc(model, x, sigmas, extra_args=extra_args, disable=True, variant=variant)
    if name in ("dpm_fast", "dpm_adaptive"):
        sigma_min = sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]
        if name == "dpm_fast":
            return reference.sampling.sample_dpm_fast(model, x, sigma_min, sigmas[0], len(sigmas) - 1,
                                                      extra_args=extra_args, disable=True)
        return reference.sampling.sample_dpm_adaptive(model, x, sigma_min, sigmas[0], extra_args=extra_args,
                                                      disable=True)
    comfy_name = "euler" if name == "ddim" else name  # ComfyUI's "ddim" is `ksampler("euler")`
    return getattr(reference.sampling, f"sample_{comfy_name}")(model, x, sigmas, extra_args=extra_args,
                                                                disable=True, **kwargs)


def _assert_comfyui_equal(name, ours, expected):
    tolerance = COMFYUI_TOLERANCE.get(name)
    if tolerance is None:
        assert torch.equal(ours, expected), (name, (ours - expected).abs().max().item())
    else:
        assert torch.allclose(ours, expected, rtol=0, atol=tolerance), (name, (ours - expected).abs().max().item())


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")  # torchsde clamping float32 times at its range ends
@pytest.mark.filterwarnings("ignore:To copy construct:UserWarning")  # ComfyUI's dpm_fast wraps tensors again
@pytest.mark.parametrize("scheduler", COMFYUI_SCHEDULERS)
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_bit_equal_to_comfyui(name, scheduler):
    """Every sampler against ComfyUI's own function on the same grid, toy denoiser and seed (ComfyUI's
    KSampler grid for that sampler, penultimate sigma dropped where ComfyUI drops it)."""
    model_sampling = model_sampling_eps()
    sigmas = ksampler_sigmas(SCHEDULE, scheduler, name, 12)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    expected = comfyui_sample(name, KDiffusionModelStub(twisted, model_sampling), x, sigmas, 42)
    ours = integrate(name, twisted, x, sigmas, seed=42, schedule=SCHEDULE)
    _assert_comfyui_equal(name, ours, expected)


def _shared_noise(x):
    generator = torch.Generator().manual_seed(5)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde"])
def test_sde_samplers_draw_from_a_brownian_tree_seeded_with_the_ksampler_seed(name):
    # ComfyUI: BrownianTreeNoiseSampler(x, min positive sigma, max sigma, seed=extra_args["seed"]), i.e. the
    # KSampler seed, one tree for the whole batch; run_sampler must hand the same seed down.
    latent, noise = torch.zeros(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigmas = SCHEDULERS["karras"](SCHEDULE, 8)
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    tree = BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], 31)
    expected = integrate(name, gaussian_denoiser, x, sigmas, noise_sampler=tree)
    out = run_sampler(name, gaussian_denoiser, latent, noise, sigmas, sigma_max=SCHEDULE.sigma_max, seed=31)
    assert torch.equal(out, expected)
    per_item = integrate(name, gaussian_denoiser, x, sigmas, seed=[31, 32])
    # One tree per item: an item's result does not depend on its batch mates.
    assert torch.equal(per_item[:1], integrate(name, gaussian_denoiser, x[:1], sigmas, seed=[31]))
    assert (per_item[1] - out[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs a positive sigma"):
        integrate(name, gaussian_denoiser, x, torch.zeros(3), seed=1)


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde"])
@pytest.mark.parametrize("seed", [0, 1234567890123, [5, 6]])
def test_sde_samplers_give_comfyuis_images_for_the_same_seed(name, seed):
    pytest.importorskip("torchsde")
    reference = load_modules()
    model_sampling = reference.model_sampling.ModelSamplingDiscrete()

    def twisted(x, sigma):
        return gaussian_denoiser(x, sigma) + 0.05 * torch.tanh(x)

    latent = torch.zeros(2, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sigmas = SCHEDULERS["karras"](SCHEDULE, 20)
    x = noise * (1 + sigmas[0] ** 2) ** 0.5
    comfy_sampler = getattr(reference.sampling, f"sample_{name}")
    expected = comfy_sampler(KDiffusionModelStub(twisted, model_sampling), x, sigmas, extra_args={"seed": seed},
                             disable=True)
    ours = run_sampler(name, twisted, latent, noise, sigmas, sigma_max=SCHEDULE.sigma_max, seed=seed)
    assert (ours - expected).abs().max().item() <= 1e-6
    assert torch.equal(ours, expected)



@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim"])
def test_samplers_read_nothing_back_per_step(name):
    """A sampling loop that branches on a device value per step stalls the GPU once per step; these samplers read
    the grid once per run, so their host reads do not grow with the number of steps. (The SDE samplers' Brownian
    noise is drawn on the CPU from sigma values, as ComfyUI's is: a read per step they cannot avoid.)"""
    schedule = DiscreteSchedule()

    def denoiser(x, sigma, **_):
        return x * (1 / (1 + sigma[:, None, None, None] ** 2))

    counts = []
    for steps in (4, 9):
        sigmas = ksampler_sigmas(schedule, "karras", name, steps)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        with HostReads() as reads:
            integrate(name, denoiser, x, sigmas, seed=1)
        counts.append(reads.count)
    assert counts[0] == counts[1], f"{name}: {counts[0]} host reads for 4 steps, {counts[1]} for 9"


@pytest.mark.parametrize("eta", [0.5, 1.0, 2.0])
def test_ancestral_landing_flags_equal_the_per_step_values(eta):
    """euler_ancestral decides "sigma_down is 0, return x0" from flags computed for the whole grid at once; they
    equal the per-step scalar values, including where a large eta clamps sigma_up to sigma_next mid-grid."""
    from sdxl_core.sampling.samplers._math import ancestral_lands_on_zero as _ancestral_lands_on_zero
    from sdxl_core.sampling.samplers._math import ancestral_step as _ancestral_step

    schedule = DiscreteSchedule()
    for grid in (ksampler_sigmas(schedule, "karras", "euler_ancestral", 10),
                 torch.tensor([14.6146, 2.0, 0.0292, 0.0])):
        per_step = [bool(_ancestral_step(grid[i], grid[i + 1], eta)[0] == 0) for i in range(len(grid) - 1)]
        assert _ancestral_lands_on_zero(grid, eta) == per_step
        assert per_step[-1]
    if eta == 2.0:
        assert any(_ancestral_lands_on_zero(torch.tensor([14.6146, 2.0, 0.0292, 0.0]), eta)[:-1])


CFG_PP_SAMPLERS = [name for name, spec in SAMPLERS.items() if spec.uncond]


def test_cfg_pp_samplers_are_flagged_and_need_the_uncond_prediction():
    assert CFG_PP_SAMPLERS == ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp",
                               "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp",
                               "gradient_estimation_cfg_pp"]
    assert all(name.endswith("_cfg_pp") == SAMPLERS[name].uncond for name in SAMPLERS)


def _guided_toy(x, sigma, y):
    """A conditional toy denoiser: the condition y (one value per item) shifts the data mean."""
    return twisted(x, sigma) + 0.2 * y.view(-1, 1, 1, 1) * torch.tanh(sigma.view(-1, 1, 1, 1))


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("cfg", [1.0, 3.5])
@pytest.mark.parametrize("name", CFG_PP_SAMPLERS + ["euler", "dpmpp_2m", "euler_ancestral"])
def test_guided_samplers_equal_comfyuis_with_its_cfg_function_and_post_cfg_hooks(name, cfg):
    """Through real guidance: CFGDenoiser against ComfyUI's `cfg_function` with the samplers' own post-CFG hooks
    (the CFG++ samplers read uncond_denoised there, and disable the cfg-1 skip). UNet passes are counted: a CFG++
    sampler evaluates the unconditional branch even at cfg 1, every other sampler skips it there."""
    from sdxl_core.sampling.guidance import CFGDenoiser

    cond_y, uncond_y = torch.tensor([[1.0]]), torch.tensor([[-0.5]])
    sigmas = ksampler_sigmas(SCHEDULE, "karras", name, 10)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * sigmas[0]
    comfy_model = GuidedModelStub(_guided_toy, cond_y, uncond_y, cfg, model_sampling_eps())
    expected = comfyui_sample(name, comfy_model, x, sigmas, 42)

    rows = []

    def inner(x, sigma, y):
        rows.append(x.shape[0])
        return _guided_toy(x, sigma, y)

    guided = CFGDenoiser(inner, {"y": cond_y}, {"y": uncond_y}, cfg)
    ours = integrate(name, guided, x, sigmas, seed=42)
    _assert_comfyui_equal(name, ours, expected)
    both_branches = cfg != 1.0 or SAMPLERS[name].uncond
    assert set(rows) == {2 * x.shape[0] if both_branches else x.shape[0]}
    assert len(rows) == comfy_model.calls


def test_cfg_pp_without_guidance_is_the_plain_sampler():
    """With no guidance the unconditional prediction is the prediction: euler_cfg_pp is euler, up to rounding
    (CFG++ writes the step as x0 + sigma_next * d, Euler as x + (sigma_next - sigma) * d)."""
    x, sigmas = _start(10)
    plain = integrate("euler", gaussian_denoiser, x, sigmas)
    cfg_pp = integrate("euler_cfg_pp", gaussian_denoiser, x, sigmas)
    assert torch.allclose(plain, cfg_pp, rtol=0, atol=1e-10)
    assert torch.allclose(integrate("dpmpp_2m", gaussian_denoiser, x, sigmas),
                          integrate("dpmpp_2m_cfg_pp", gaussian_denoiser, x, sigmas), rtol=0, atol=1e-10)


def test_lcm_steps_by_hand():
    # Each step jumps to x0 and renoises it to the next sigma with the seeded generator's next draw.
    sigmas = torch.tensor([3.0, 1.0, 0.0])
    x = torch.ones(1, 1, 2, 2)
    generator = torch.Generator().manual_seed(11)
    first_noise = torch.randn(x.shape, generator=generator)
    seen = []
    out = integrate("lcm", lambda x, s: 0.5 * x, x, sigmas, seed=11, callback=lambda info: seen.append(info["x"]))
    assert torch.equal(seen[1], 0.5 * x + first_noise * 1.0)
    assert torch.equal(out, 0.5 * seen[1])  # the last step returns x0


def test_samplers_that_read_the_schedule_say_so():
    assert [name for name, spec in SAMPLERS.items() if spec.schedule] == ["sa_solver", "sa_solver_pece"]
    x, sigmas = _start(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="sa_solver reads the model's noise schedule: pass schedule="):
        integrate("sa_solver", gaussian_denoiser, x, sigmas, seed=1)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_gpu_variants_equal_the_cpu_ones_on_a_cpu(name):
    """The `_gpu` names draw their Brownian tree on the latent's device: on a CPU with float32 sigmas that is the
    same tree as the CPU variant's, so the samples agree bit for bit (on a GPU they differ, as in ComfyUI)."""
    assert SAMPLERS[f"{name}_gpu"].noise is NoiseKind.BROWNIAN_DEVICE and SAMPLERS[name].noise is NoiseKind.BROWNIAN
    x, sigmas = _start(8, dtype=torch.float32)
    assert torch.equal(integrate(name, gaussian_denoiser, x, sigmas, seed=5),
                       integrate(f"{name}_gpu", gaussian_denoiser, x, sigmas, seed=5))


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2", "dpm_2", "dpm_2_ancestral"])
def test_discard_penultimate_sigma_samplers(name):
    from sdxl_core.sampling.schedules import DISCARD_PENULTIMATE_SIGMA_SAMPLERS

    assert DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
    grid = ksampler_sigmas(SCHEDULE, "karras", name, 10)
    eleven = SCHEDULERS["karras"](SCHEDULE, 11)
    assert len(grid) == 11 and torch.equal(grid, torch.cat([eleven[:-2], eleven[-1:]]))
