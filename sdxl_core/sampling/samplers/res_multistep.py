"""Exponential multistep samplers: res_multistep (Zhang et al. 2023, arXiv 2308.02157, the second-order RES
multistep scheme) with its ancestral and CFG++ forms, and gradient_estimation (Permenter & Yuan 2024,
"Interpreting and Improving Diffusion Models from an Optimization Perspective") with its CFG++ form."""

from __future__ import annotations

import torch

from ._math import ancestral_lands_on_zero, ancestral_step, derivative, lambda_of, zero_flags
from ._registry import NoiseKind, register


def _phi_1(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t) / t


def _phi_2(t: torch.Tensor) -> torch.Tensor:
    return (_phi_1(t) - 1.0) / t


def _res_multistep(denoiser, x, sigmas, loop, noise, *, eta, s_noise, cfg_pp):
    """k-diffusion `res_multistep`: an exponential-integrator step to sigma_down whose x0 is extrapolated from the
    previous step's with the phi_1/phi_2 weights (Euler on the first step and where sigma_down is 0), then fresh
    noise of std sigma_up when eta > 0. With CFG++ the step moves along the unconditional prediction and lands on
    the guided one."""
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = ancestral_lands_on_zero(sigmas, eta)
    zero = zero_flags(sigmas)
    old_denoised, old_sigma_down = None, None
    for i in loop.steps(sigmas):
        if cfg_pp:
            denoised, uncond = denoiser(x, sigmas[i] * s_in)
        else:
            denoised = uncond = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        loop.report(i, x, sigmas[i], denoised)
        if lands_on_zero[i] or old_denoised is None:
            if cfg_pp:
                x = denoised + derivative(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next = lambda_of(sigmas[i]), lambda_of(old_sigma_down), lambda_of(sigma_down)
            h = t_next - t
            c2 = (lambda_of(sigmas[i - 1]) - t_old) / h
            phi_1, phi_2 = _phi_1(-h), _phi_2(-h)
            b1 = torch.nan_to_num(phi_1 - phi_2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi_2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = h.neg().exp() * x + h * (b1 * uncond + b2 * old_denoised)
        if noise is not None and not zero[i + 1]:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = uncond, sigma_down
    return x


@register("res_multistep")
@torch.no_grad()
def sample_res_multistep(denoiser, x, sigmas, loop):
    """RES multistep, deterministic (eta 0)."""
    return _res_multistep(denoiser, x, sigmas, loop, None, eta=0.0, s_noise=1.0, cfg_pp=False)


@register("res_multistep_cfg_pp", uncond=True)
@torch.no_grad()
def sample_res_multistep_cfg_pp(denoiser, x, sigmas, loop):
    """RES multistep with CFG++, deterministic."""
    return _res_multistep(denoiser, x, sigmas, loop, None, eta=0.0, s_noise=1.0, cfg_pp=True)


@register("res_multistep_ancestral", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_res_multistep_ancestral(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """RES multistep with ancestral noise."""
    return _res_multistep(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, cfg_pp=False)


@register("res_multistep_ancestral_cfg_pp", noise=NoiseKind.GAUSSIAN, uncond=True)
@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """RES multistep with ancestral noise and CFG++."""
    return _res_multistep(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, cfg_pp=True)


def _gradient_estimation(denoiser, x, sigmas, loop, *, ge_gamma, cfg_pp):
    """Euler steps whose slope is pushed along its change since the last step, d + (gamma - 1)(d - d_prev): the
    paper's momentum-like gradient estimate (k-diffusion `sample_gradient_estimation`)."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    old_d = None
    for i in loop.steps(sigmas):
        if cfg_pp:
            denoised, uncond = denoiser(x, sigmas[i] * s_in)
        else:
            denoised = uncond = denoiser(x, sigmas[i] * s_in)
        d = derivative(x, sigmas[i], uncond)
        loop.report(i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if zero[i + 1]:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@register("gradient_estimation")
@torch.no_grad()
def sample_gradient_estimation(denoiser, x, sigmas, loop, *, ge_gamma=2.0):
    """Gradient estimation with gamma = 2."""
    return _gradient_estimation(denoiser, x, sigmas, loop, ge_gamma=ge_gamma, cfg_pp=False)


@register("gradient_estimation_cfg_pp", uncond=True)
@torch.no_grad()
def sample_gradient_estimation_cfg_pp(denoiser, x, sigmas, loop, *, ge_gamma=2.0):
    """Gradient estimation with CFG++."""
    return _gradient_estimation(denoiser, x, sigmas, loop, ge_gamma=ge_gamma, cfg_pp=True)
