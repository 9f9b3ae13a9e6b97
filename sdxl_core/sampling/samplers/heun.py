"""Second-order single-step samplers with an extra evaluation per step: heun and dpm_2."""

from __future__ import annotations

import torch

from ._math import derivative, zero_flags
from ._registry import register


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
