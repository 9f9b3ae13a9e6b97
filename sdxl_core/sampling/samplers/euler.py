"""Euler-family samplers: euler, euler_ancestral, their CFG++ forms, and ddim (ComfyUI runs Euler for its "ddim")."""

from __future__ import annotations

import torch

from ._math import ancestral_lands_on_zero, ancestral_step, derivative, zero_flags
from ._registry import NoiseKind, register


@register("euler")
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, loop):
    """Euler steps on the probability-flow ODE, Karras et al. (2022) Algorithm 2 without churn (ComfyUI's
    KSampler never sets s_churn, whose noise would come from the global RNG)."""
    s_in = x.new_ones([x.shape[0]])
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        d = derivative(x, sigmas[i], denoised)
        loop.report(i, x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@register("euler_ancestral", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`): Euler to sigma_down, then noise of std sigma_up."""
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = ancestral_lands_on_zero(sigmas, eta)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        loop.report(i, x, sigmas[i], denoised)
        if lands_on_zero[i]:
            x = denoised
        else:
            d = derivative(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@register("ddim")
def sample_ddim(denoiser, x, sigmas, loop):
    """DDIM (Song et al. 2021) with eta 0, which is the Euler step in sigma; ComfyUI's "ddim" runs `sample_euler`."""
    return sample_euler(denoiser, x, sigmas, loop)


def _euler_ancestral_cfg_pp(denoiser, x, sigmas, loop, noise, eta, s_noise):
    """CFG++ (Chung et al. 2024, arXiv 2406.08070) on the Euler / DDIM step, k-diffusion
    `sample_euler_ancestral_cfg_pp`: x0 is the guided prediction, but the noise direction is re-derived from the
    unconditional one, which keeps the trajectory on the data manifold at low guidance scales."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised, uncond = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
            continue
        # alpha = sigma * exp(lambda) with lambda = -log(sigma): 1 for a VE model, up to float rounding.
        alpha_s = sigmas[i] * sigmas[i].log().neg().exp()
        alpha_t = sigmas[i + 1] * sigmas[i + 1].log().neg().exp()
        d = derivative(x, sigmas[i], alpha_s * uncond)
        sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if noise is not None and eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@register("euler_cfg_pp", uncond=True)
@torch.no_grad()
def sample_euler_cfg_pp(denoiser, x, sigmas, loop):
    """Euler with CFG++ (the DDIM form, eta 0)."""
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, loop, None, 0.0, 0.0)


@register("euler_ancestral_cfg_pp", noise=NoiseKind.GAUSSIAN, uncond=True)
@torch.no_grad()
def sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """Ancestral Euler with CFG++."""
    return _euler_ancestral_cfg_pp(denoiser, x, sigmas, loop, noise, eta, s_noise)
