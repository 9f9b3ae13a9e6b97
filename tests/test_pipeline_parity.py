"""End-to-end parity with diffusers' SDXL pipelines on the tiny models (docs/sampling.md).

Our side runs prompt encoding, micro-conditioning, ADM vector, UNet, guidance and sampler through
`sdxl_core.pipeline`; diffusers runs `StableDiffusionXLPipeline` (and `StableDiffusionXLImg2ImgPipeline` for the
refiner) on the same weights converted by diffusers' own single-file code. Both start from the same noise and walk
diffusers' own sigma grid, so every UNet call can be compared input by input, and the final latents to 1e-4.

What is deliberately taken from diffusers rather than compared:
- the sigma grid: diffusers computes the schedule in float32, ours is float64 like sgm/ComfyUI (the two differ by
  at most 1.3e-5 relative, checked below), so our sampler walks diffusers' float32 sigmas;
- the start scale: diffusers multiplies `latents` by `scheduler.init_noise_sigma`, which for "leading" spacing is
  sqrt(sigma_0^2 + 1) (Euler) or 1 (DPM-Solver, which works on the variance-preserving sample x / sqrt(sigma^2 + 1));
  our samplers work on x = x0 + sigma * noise, so the same noise enters as noise * sqrt(sigma_0^2 + 1) in both cases.
"""

from __future__ import annotations

import pytest
import torch

from sdxl_core.conditioning import BaseMicroConditioning, RefinerMicroConditioning, with_micro_conditioning
from sdxl_core.config import TINY_BASE
from sdxl_core.pipeline import encode_base_conditioning, encode_refiner_conditioning
from sdxl_core.sampling.ksampler import denoise_from, sample_latent
from sdxl_core.sampling.model_sampling import model_sampling_for
from sdxl_core.sampling.settings import SamplingSettings
from tests._diffusers_reference import (
    SCHEDULERS,
    UNetCalls,
    compare_calls,
    diffusers_clip_tokenizers,
    euler_scheduler,
    relative_error,
)
from tests._diffusers_reference import base_pipeline as _base_pipeline
from tests._diffusers_reference import refiner_pipeline as _refiner_pipeline
from tests._diffusers_twins import diffusers_unet, diffusers_vae

SCHEDULE = model_sampling_for(TINY_BASE).schedule

pytest.importorskip("diffusers")  # the helpers above import it only when called
# diffusers 0.42 schedulers call np.array(tensor, copy=False) on torch tensors; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64  # pixels: 8x8 latents
STEPS = 10
CFG = 5.0
SEED = 7
PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds"
# Non-empty so diffusers' force_zeros_for_empty_prompt stays out of it. No "!" anywhere: diffusers' tokenizer_2
# (pad token "!") encodes it as id 0 where bigG's tokenizer keeps 256 (tests/text/test_prompt_encoding.py).
NEGATIVE = "blurry, low quality, watermark"
REFINER_SPLIT = 0.8  # diffusers' denoising_end / denoising_start
POSITIVE_AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5
# diffusers' DPMSolverMultistepScheduler steps on the variance-preserving sample; Euler on x = x0 + sigma * noise.
VARIANCE_PRESERVING = {"euler": False, "dpmpp_2m": True}

LATENT_TOLERANCE = 1e-4
CONDITIONING_TOLERANCE = 1e-5  # context and y before any sampling: text encoders and ADM only
EPS_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's waiting threads make
    # each tiny UNet call tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return diffusers_clip_tokenizers(tmp_path_factory.mktemp("parity_tokenizer"))


@pytest.fixture(scope="module")
def reference_parts(tiny_base, tiny_refiner):
    """Converted once per module: the two UNets and the VAE (never run, since latents are compared, but the
    pipelines read its config; diffusers' refiner example shares the base's VAE)."""
    return {"vae": diffusers_vae(tiny_base.vae), "base": diffusers_unet(tiny_base.unet),
            "refiner": diffusers_unet(tiny_refiner.unet)}


@pytest.fixture(scope="module")
def base_pipeline(tiny_base, tokenizers, reference_parts):
    return lambda scheduler: _base_pipeline(tiny_base, tokenizers, scheduler, vae=reference_parts["vae"],
                                            unet=reference_parts["base"])


@pytest.fixture(scope="module")
def refiner_pipeline(tiny_refiner, tokenizers, reference_parts):
    return lambda scheduler: _refiner_pipeline(tiny_refiner, tokenizers, scheduler, vae=reference_parts["vae"],
                                               unet=reference_parts["refiner"])


@pytest.fixture(scope="module")
def base_conditioning(tiny_base):
    micro = BaseMicroConditioning(original_size=(SIZE, SIZE))  # original = target = generation size, crop (0, 0)
    return (encode_base_conditioning(tiny_base, PROMPT, micro=micro),
            encode_base_conditioning(tiny_base, NEGATIVE, micro=micro))


@pytest.fixture(scope="module")
def refiner_conditioning(tiny_refiner):
    micro = RefinerMicroConditioning(original_size=(SIZE, SIZE))
    return (encode_refiner_conditioning(tiny_refiner, PROMPT, aesthetic_score=POSITIVE_AESTHETIC, micro=micro),
            encode_refiner_conditioning(tiny_refiner, NEGATIVE, aesthetic_score=NEGATIVE_AESTHETIC, micro=micro))


def start_noise() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))


def to_model_scale(sampler: str, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A diffusers scheduler sample at `sigma` as our samplers hold it (x = x0 + sigma * noise)."""
    return sample * (sigma**2 + 1) ** 0.5 if VARIANCE_PRESERVING[sampler] else sample


def diffusers_handoff_step(timesteps: torch.Tensor, split: float) -> int:
    """How many steps the base runs: diffusers keeps t >= round(1000 * (1 - split)) on the base
    (`denoising_end`) and t below it on the refiner (`denoising_start`)."""
    cutoff = int(round(1000 - split * 1000))
    return int((timesteps >= cutoff).sum())


def run_diffusers_base(pipe, noise: torch.Tensor, **options) -> tuple[torch.Tensor, UNetCalls]:
    with UNetCalls(pipe.unet) as calls, torch.no_grad():
        latents = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                       guidance_scale=CFG, latents=noise.clone(), output_type="latent", **options).images
    return latents, calls


def run_ours(model, x, sigmas, conditioning, sampler) -> tuple[torch.Tensor, UNetCalls]:
    positive, negative = conditioning
    with UNetCalls(model.unet) as calls:
        latents = denoise_from(model, x, sigmas, positive, negative, cfg=CFG, sampler=sampler)
    return latents, calls


def assert_calls_match(ours: UNetCalls, reference: UNetCalls, stage: str) -> dict[str, float]:
    worst = compare_calls(ours, reference)
    assert worst["context"] <= CONDITIONING_TOLERANCE, f"{stage}: text context differs by {worst['context']:.2e}"
    assert worst["y"] <= CONDITIONING_TOLERANCE, f"{stage}: ADM vector differs by {worst['y']:.2e}"
    assert worst["x"] <= LATENT_TOLERANCE, f"{stage}: UNet input differs by {worst['x']:.2e}"
    assert worst["eps"] <= EPS_TOLERANCE, f"{stage}: predicted noise differs by {worst['eps']:.2e}"
    # The comparison can fail: the two guidance branches differ by ~1% of eps on these random weights (at least ten
    # times the tolerance), so mixing them up or mis-weighting them shows in the next call's input and the result.
    for call in ours.calls:
        uncond, cond = call["eps"].chunk(2)
        assert relative_error(uncond, cond) > 10 * EPS_TOLERANCE
    return worst


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_txt2img_matches_diffusers(sampler, tiny_base, base_pipeline, base_conditioning):
    scheduler = SCHEDULERS[sampler]()
    pipe = base_pipeline(scheduler)
    noise = start_noise()
    reference, reference_calls = run_diffusers_base(pipe, noise)
    sigmas = scheduler.sigmas  # float32, ends in 0 (final_sigmas_type "zero" for DPM-Solver)
    assert len(sigmas) == STEPS + 1 and sigmas[-1] == 0

    x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    assert torch.allclose(to_model_scale(sampler, noise * scheduler.init_noise_sigma, sigmas[0]), x, rtol=1e-6)
    ours, calls = run_ours(tiny_base, x, sigmas, base_conditioning, sampler)

    # Our EpsDenoiser maps each of diffusers' sigmas back to diffusers' integer timestep.
    assert calls.timesteps() == reference_calls.timesteps() == scheduler.timesteps.double().tolist()
    worst = assert_calls_match(calls, reference_calls, "base")
    err = relative_error(ours, reference)
    print(f"{sampler} txt2img: final latents {err:.2e}, per call {worst}")
    assert err <= LATENT_TOLERANCE
    assert relative_error(ours, x) > 0.1  # sampling did something


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_refiner_handoff_matches_diffusers(sampler, tiny_base, tiny_refiner, base_pipeline, refiner_pipeline,
                                           base_conditioning, refiner_conditioning):
    base_scheduler, refiner_scheduler = SCHEDULERS[sampler](), SCHEDULERS[sampler]()
    # The img2img pipeline adds a step to the refiner's share for second-order schedulers; neither is one.
    assert base_scheduler.order == 1
    base_pipe, refiner_pipe = base_pipeline(base_scheduler), refiner_pipeline(refiner_scheduler)
    noise = start_noise()
    reference_handoff, reference_base_calls = run_diffusers_base(base_pipe, noise, denoising_end=REFINER_SPLIT)
    with UNetCalls(refiner_pipe.unet) as reference_refiner_calls, torch.no_grad():
        reference = refiner_pipe(PROMPT, image=reference_handoff.clone(), negative_prompt=NEGATIVE,
                                 num_inference_steps=STEPS, guidance_scale=CFG, denoising_start=REFINER_SPLIT,
                                 aesthetic_score=POSITIVE_AESTHETIC, negative_aesthetic_score=NEGATIVE_AESTHETIC,
                                 output_type="latent").images

    sigmas = base_scheduler.sigmas
    assert torch.equal(refiner_scheduler.sigmas, sigmas)
    k = diffusers_handoff_step(base_scheduler.timesteps, REFINER_SPLIT)
    assert 0 < k < STEPS
    timesteps = base_scheduler.timesteps.double().tolist()
    assert reference_base_calls.timesteps() == timesteps[:k]
    assert reference_refiner_calls.timesteps() == timesteps[k:]

    # Base: steps [0, k) end at sigmas[k] with the noise left in; the refiner continues from there, adding none.
    handoff, base_calls = run_ours(tiny_base, noise * (sigmas[0] ** 2 + 1) ** 0.5, sigmas[:k + 1],
                                   base_conditioning, sampler)
    base_worst = assert_calls_match(base_calls, reference_base_calls, "base")
    handoff_err = relative_error(handoff, to_model_scale(sampler, reference_handoff, sigmas[k]))
    assert handoff_err <= LATENT_TOLERANCE

    ours, refiner_calls = run_ours(tiny_refiner, handoff, sigmas[k:], refiner_conditioning, sampler)
    refiner_worst = assert_calls_match(refiner_calls, reference_refiner_calls, "refiner")
    err = relative_error(ours, reference)
    print(f"{sampler} handoff at step {k}: handoff latents {handoff_err:.2e}, final latents {err:.2e}, "
          f"base calls {base_worst}, refiner calls {refiner_worst}")
    assert err <= LATENT_TOLERANCE
    assert relative_error(ours, handoff) > 1e-3  # the refiner changed the latents

    # The same split through `sample_latent`, as `generate` runs it (KSamplerAdvanced: base end_step=k with leftover
    # noise, refiner start_step=k without added noise). Its own noise follows ComfyUI's start convention, so the
    # already-noised start goes in as the (unscaled) latent with add_noise off.
    scale = tiny_base.config.vae.scale_factor
    settings = dict(settings=SamplingSettings(seed=SEED, steps=STEPS, cfg=CFG, sampler=sampler, scheduler="normal"),
                    sigmas=sigmas, add_noise=False)
    latent = {"samples": noise * (sigmas[0] ** 2 + 1) ** 0.5 / scale}
    latent = sample_latent(tiny_base, latent, *base_conditioning, end_step=k, return_with_leftover_noise=True,
                           **settings)
    assert relative_error(latent["samples"] * scale, handoff) <= 1e-5  # only the VAE-scale round trip differs
    latent = sample_latent(tiny_refiner, latent, *refiner_conditioning, start_step=k, **settings)
    assert relative_error(latent["samples"] * scale, reference) <= LATENT_TOLERANCE


def test_negative_aesthetic_score_is_what_diffusers_uses(tiny_refiner, refiner_pipeline, refiner_conditioning):
    """The call-by-call check is what pins the refiner's micro-conditioning: a wrong negative aesthetic score moves
    the final latents by only ~2e-5 relative (the refiner runs at low noise), but its ADM vector by far more."""
    scheduler = euler_scheduler()
    pipe = refiner_pipeline(scheduler)
    scheduler.set_timesteps(STEPS)
    k = diffusers_handoff_step(scheduler.timesteps, REFINER_SPLIT)
    start = start_noise() * scheduler.sigmas[k]
    with UNetCalls(pipe.unet) as reference_calls, torch.no_grad():
        pipe(PROMPT, image=start.clone(), negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
             denoising_start=REFINER_SPLIT, output_type="latent")
    positive, negative = refiner_conditioning
    wrong = (positive, with_micro_conditioning(negative, aesthetic_score=POSITIVE_AESTHETIC))
    _, calls = run_ours(tiny_refiner, start, scheduler.sigmas[k:], wrong, "euler")
    assert compare_calls(calls, reference_calls)["y"] > 1e-2
    _, calls = run_ours(tiny_refiner, start, scheduler.sigmas[k:], refiner_conditioning, "euler")
    assert compare_calls(calls, reference_calls)["y"] <= CONDITIONING_TOLERANCE


def test_diffusers_float32_grid_is_our_schedule_at_its_timesteps():
    """Why the parity runs walk diffusers' sigma tensor: it is our float64 schedule at the same integer timesteps,
    rounded through float32 betas (docs/sampling.md#the-noise-schedule: at most 1.3e-5 relative)."""
    schedule = SCHEDULE
    for make in SCHEDULERS.values():
        scheduler = make()
        scheduler.set_timesteps(STEPS)
        ours = schedule.sigmas.double()[scheduler.timesteps.long()]
        err = ((scheduler.sigmas[:-1].double() - ours).abs() / ours).max().item()
        assert 0 < err <= 1.3e-5
        assert torch.equal(schedule.timestep(scheduler.sigmas[:-1]), scheduler.timesteps.long())


def test_fractional_timesteps_are_the_only_difference(tiny_base, base_pipeline, base_conditioning):
    """diffusers' Euler with "linspace" spacing evaluates the UNet at fractional timesteps (999, 856.3, ...), while
    our denoiser, like ComfyUI and sgm, feeds the nearest integer timestep in log sigma. Rounding diffusers'
    timesteps the same way restores parity to 1e-4, so nothing else differs."""
    from diffusers import EulerDiscreteScheduler

    steps = 8  # 999 / 7 is not an integer
    noise = start_noise()

    def run_reference(round_timesteps: bool):
        scheduler = EulerDiscreteScheduler.from_config(euler_scheduler().config, timestep_spacing="linspace")
        pipe = base_pipeline(scheduler)
        handle = None
        if round_timesteps:
            def nearest_timestep(_module, args):
                sigma = scheduler.sigmas[scheduler.step_index]
                return (args[0], SCHEDULE.timestep(sigma).float(), *args[2:])
            handle = pipe.unet.register_forward_pre_hook(nearest_timestep)
        try:
            with torch.no_grad():
                latents = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                               guidance_scale=CFG, latents=noise.clone(), output_type="latent").images
        finally:
            if handle is not None:
                handle.remove()
        return latents, scheduler

    reference, scheduler = run_reference(round_timesteps=False)
    assert (scheduler.timesteps != scheduler.timesteps.round()).any()
    sigmas = scheduler.sigmas
    ours, calls = run_ours(tiny_base, noise * scheduler.init_noise_sigma, sigmas, base_conditioning, "euler")
    assert calls.timesteps() == SCHEDULE.timestep(sigmas[:-1]).double().tolist()
    unrounded_err = relative_error(ours, reference)
    rounded, _ = run_reference(round_timesteps=True)
    rounded_err = relative_error(ours, rounded)
    print(f"linspace Euler: {unrounded_err:.2e} with diffusers' fractional timesteps, {rounded_err:.2e} rounded")
    assert unrounded_err > LATENT_TOLERANCE
    assert rounded_err <= LATENT_TOLERANCE
