"""Single-step samplers with extra evaluations per step: heun, heunpp2, dpm_2 and dpm_2_ancestral."""

from __future__ import annotations

import torch

from ._math import ancestral_lands_on_zero, ancestral_step, derivative, zero_flags
from ._registry import NoiseKind, register


@register("heun")
@torch.no_grad()
def sample_heun(denoiser, x, sigmas, loop):
    """Heun's second-order method, Karras et al. (2022) Algorithm 2 without churn; Euler on the last step to 0."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = derivative(x, sigmas[i], denoised)
        loop.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if zero[i + 1]:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = derivative(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


@register("dpm_2")
@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, loop):
    """DPM-Solver-2 (Lu et al. 2022) as a midpoint method in log sigma, k-diffusion `sample_dpm_2`."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = derivative(x, sigmas[i], denoised)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = derivative(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@register("dpm_2_ancestral", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver-2 to sigma_down, then fresh noise of std sigma_up (k-diffusion `sample_dpm_2_ancestral`); Euler
    where sigma_down is 0, which adds no noise."""
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = ancestral_lands_on_zero(sigmas, eta)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        loop.report(i, x, sigmas[i], denoised)
        d = derivative(x, sigmas[i], denoised)
        if lands_on_zero[i]:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = derivative(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@register("heunpp2")
@torch.no_grad()
def sample_heunpp2(denoiser, x, sigmas, loop):
    """Heun++ (ComfyUI `sample_heunpp2`, after Carzit's sd-webui-samplers-scheduler): a third evaluation one step
    further on, the three slopes weighted by their sigmas relative to 3 sigma_0 (2 sigma_0 for the Heun step one
    before the end, plain Euler on the last step). Without churn, as ComfyUI's KSampler runs it."""
    s_in = x.new_ones([x.shape[0]])
    grid = sigmas.detach().cpu().tolist()
    last = grid[-1]
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = derivative(x, sigmas[i], denoised)
        loop.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if grid[i + 1] == last:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = derivative(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in))
        if grid[i + 2] == last:
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            slope = d * (1 - w2) + d_2 * w2
        else:
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = derivative(x_3, sigmas[i + 2], denoiser(x_3, sigmas[i + 2] * s_in))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            slope = (1 - w2 - w3) * d + w2 * d_2 + w3 * d_3
        x = x + slope * dt
    return x
