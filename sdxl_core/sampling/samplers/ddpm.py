"""Samplers that step in the variance-preserving frame of the discrete model: ddpm (ancestral DDPM) and lcm."""

from __future__ import annotations

import torch

from ..noise import noise_scaling
from ._math import zero_flags
from ._registry import NoiseKind, register


@register("ddpm", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, loop, noise):
    """Ancestral sampling of Ho et al. (2020), Algorithm 2, between the grid's noise levels (ComfyUI `sample_ddpm`):
    the posterior mean of x_{t-1} given x_t and the predicted eps, plus the posterior std times fresh noise, in the
    VP frame x / sqrt(1 + sigma^2) with alpha_bar = 1 / (1 + sigma^2)."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in)
        loop.report(i, x, sigma, denoised)
        eps = (x - denoised) / sigma
        x_vp = x / torch.sqrt(1.0 + sigma**2.0)
        alpha_bar = 1 / ((sigma * sigma) + 1)
        alpha_bar_next = 1 / ((sigma_next * sigma_next) + 1)
        alpha = alpha_bar / alpha_bar_next
        x = (1.0 / alpha).sqrt() * (x_vp - (1 - alpha) * eps / (1 - alpha_bar).sqrt())
        if not zero[i + 1]:
            posterior_std = ((1 - alpha) * (1.0 - alpha_bar_next) / (1.0 - alpha_bar)).sqrt()
            x += posterior_std * noise(sigma, sigma_next)
            x *= torch.sqrt(1.0 + sigma_next**2.0)
    return x


@register("lcm", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, loop, noise):
    """Latent Consistency Model sampling (Luo et al. 2023, arXiv 2310.04378, Algorithm 1; ComfyUI `sample_lcm`):
    jump to the predicted x0, then renoise it to the next sigma with fresh noise."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        x = denoised
        if not zero[i + 1]:
            x = noise_scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x, max_denoise=False)
    return x
