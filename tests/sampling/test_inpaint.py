"""Inpainting with a LATENT's noise_mask: equal to ComfyUI's KSamplerX0Inpaint + sampler on a toy denoiser and on
the tiny model's guided denoiser, and the properties the mask promises."""

import math

import pytest
import torch

from sdxl_core.sampling.inpaint import InpaintingDenoiser, prepare_denoise_mask
from sdxl_core.sampling.ksampler import guided_denoiser
from sdxl_core.sampling.noise import prepare_noise
from sdxl_core.sampling.samplers import run_sampler
from sdxl_core.sampling.schedules import DiscreteSchedule, ksampler_sigmas
from tests._comfyui_reference import KDiffusionModelStub, lift, load_modules, requires_comfyui
from tests._sampling_helpers import sample_with

SCHEDULE = DiscreteSchedule()


def toy_denoiser(x, sigma):
    s = sigma.view(-1, 1, 1, 1)
    return x / (s**2 + 1) + 0.05 * torch.tanh(x)


def pixel_mask(batch=1, size=64, seed=3):
    """A soft MASK at pixel resolution: its bilinear resize to the latent blends at the edges."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, size, size)
    mask[:, size // 4: 3 * size // 4, size // 3:] = 1.0
    return (mask + 0.1 * torch.rand(batch, size, size, generator=generator)).clamp(0, 1)


def comfy_inpaint(denoiser, latent, noise, noise_mask, sigmas, sampler, seed=42):
    """ComfyUI's KSAMPLER.sample with a denoise mask: reshape_mask, KSamplerX0Inpaint, noise_scaling, sampler."""
    reference = load_modules()
    # What ComfyUI's model_base.model_sampling builds for SDXL: the discrete schedule with EPS's noise scaling.
    ms = reference.model_sampling
    model_sampling = type("ModelSampling", (ms.ModelSamplingDiscrete, ms.EPS), {})()
    utils = lift("comfy/utils.py", "reshape_mask", "repeat_to_batch_size")
    inpaint = lift("comfy/samplers.py", "KSamplerX0Inpaint")["KSamplerX0Inpaint"]
    mask = utils["reshape_mask"](noise_mask, noise.shape)
    wrap = KDiffusionModelStub(denoiser, model_sampling)
    # KSamplerX0Inpaint sits one level above the stub's usual place: samplers reach the schedule one level up too.
    wrap.inner_model.model_sampling = model_sampling
    # BaseModel.scale_latent_inpaint (comfy/model_base.py) is this one line over the model's noise_scaling.
    wrap.inner_model.scale_latent_inpaint = lambda x, sigma, noise, latent_image: \
        model_sampling.noise_scaling(sigma.reshape([sigma.shape[0]] + [1] * (noise.ndim - 1)), noise, latent_image)
    model_k = inpaint(wrap, sigmas)
    model_k.latent_image, model_k.noise = latent, noise
    # KSAMPLER.max_denoise: the grid starts at the schedule's top, within float32 rounding.
    max_sigma, first = float(model_sampling.sigma_max), float(sigmas[0])
    max_denoise = math.isclose(max_sigma, first, rel_tol=1e-05) or first > max_sigma
    x = model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise)
    sample = getattr(reference.sampling, f"sample_{sampler}")
    return sample(model_k, x, sigmas, extra_args={"denoise_mask": mask, "seed": seed}, disable=True)


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("denoise", [1.0, 0.55])
def test_toy_denoiser_equals_comfyui(sampler, denoise):
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    sigmas = ksampler_sigmas(SCHEDULE, "karras", sampler, 10, denoise)
    noise_mask = pixel_mask(batch=2)
    expected = comfy_inpaint(toy_denoiser, latent, noise, noise_mask, sigmas.float(), sampler)
    mask = prepare_denoise_mask(noise_mask, latent.shape)
    ours = run_sampler(sampler, InpaintingDenoiser(toy_denoiser, latent, noise, mask), latent, noise, sigmas.float(),
                       sigma_max=SCHEDULE.sigma_max, seed=42)
    assert torch.equal(ours, expected)


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("add_noise", [True, False])
def test_tiny_model_ksampler_equals_comfyui(tiny_base, add_noise):
    """sample_latent with a noise_mask = ComfyUI's KSampler path around the same guided model (the latent scaled
    in, noise from the seed or zeros without add_noise, the mask resized from pixels)."""
    from sdxl_core.pipeline import encode_base_conditioning

    positive, negative = encode_base_conditioning(tiny_base, "a cat"), encode_base_conditioning(tiny_base, "")
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    latent = {"samples": samples, "noise_mask": pixel_mask()}
    settings = dict(seed=5, steps=4, cfg=4.0, sampler="euler", scheduler="normal", denoise=0.7)
    ours = sample_with(tiny_base, latent, positive, negative, add_noise=add_noise, **settings)["samples"]

    scale = tiny_base.config.vae.scale_factor
    noise = prepare_noise(samples, 5) if add_noise else torch.zeros_like(samples)
    sigmas = ksampler_sigmas(DiscreteSchedule(), "normal", "euler", 4, 0.7)
    guided = guided_denoiser(tiny_base, positive, negative, 4.0, (8, 8))
    with torch.inference_mode():
        expected = comfy_inpaint(guided, samples * scale, noise, latent["noise_mask"], sigmas, "euler", seed=5)
    torch.testing.assert_close(ours, expected / scale, rtol=0, atol=0)


def test_kept_region_ends_on_the_original_latent(tiny_base):
    from sdxl_core.pipeline import encode_base_conditioning

    positive, negative = encode_base_conditioning(tiny_base, "a cat"), encode_base_conditioning(tiny_base, "")
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0  # at latent resolution: no blended edge
    settings = dict(seed=5, steps=3, cfg=4.0, sampler="euler", scheduler="normal")
    out = sample_with(tiny_base, {"samples": samples, "noise_mask": mask}, positive, negative, **settings)
    torch.testing.assert_close(out["samples"][..., :4], samples[..., :4], rtol=1e-6, atol=1e-6)
    assert (out["samples"][..., 4:] - samples[..., 4:]).abs().max() > 0.1
    assert torch.equal(out["noise_mask"], mask)  # carried on to the next stage, as KSamplerAdvanced does
    full = sample_with(tiny_base, {"samples": samples, "noise_mask": torch.ones(8, 8)}, positive, negative,
                         **settings)
    plain = sample_with(tiny_base, {"samples": samples}, positive, negative, **settings)
    assert torch.equal(full["samples"], plain["samples"])  # an all-repaint mask is plain sampling, bit for bit


def test_mask_resizing_and_batches():
    mask = prepare_denoise_mask(torch.ones(1, 1, 64, 48), (3, 4, 8, 6))
    assert mask.shape == (3, 4, 8, 6) and torch.equal(mask, torch.ones_like(mask))
    assert prepare_denoise_mask(torch.rand(2, 16, 16), (2, 4, 2, 2)).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match="mask has 2 images but the latent batch has 3"):
        prepare_denoise_mask(torch.rand(2, 16, 16), (3, 4, 2, 2))
    with pytest.raises(ValueError, match=r"MASK \[height, width\]"):
        prepare_denoise_mask(torch.rand(1, 3, 16, 16), (1, 4, 2, 2))
    with pytest.raises(ValueError, match="NaN"):
        prepare_denoise_mask(torch.full((4, 4), float("nan")), (1, 4, 2, 2))
