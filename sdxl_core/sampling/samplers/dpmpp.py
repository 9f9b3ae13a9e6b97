"""DPM-Solver++ samplers (Lu et al. 2022, arXiv 2211.01095): dpmpp_2m, dpmpp_sde and dpmpp_2m_sde."""

from __future__ import annotations

import torch

from ._math import ancestral_step, zero_flags
from ._registry import NoiseKind, register


@register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, loop):
    """DPM-Solver++(2M), Algorithm 2 of the paper; first-order on the first and last step."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is not None and not zero[i + 1]:
            r = (t + sigmas[i - 1].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        else:
            denoised_d = denoised
        x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@register("dpmpp_sde", noise=NoiseKind.BROWNIAN)
@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, second order with a midpoint at ratio r), k-diffusion `sample_dpmpp_sde`."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
            continue
        # lambda = log(alpha/sigma) = -log(sigma) in the VE parameterisation of an eps model.
        lambda_s, lambda_t = -sigmas[i].log(), -sigmas[i + 1].log()
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = (-lambda_s_1).exp()
        alpha_s, alpha_t = sigmas[i] * lambda_s.exp(), sigmas[i + 1] * lambda_t.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()

        sd, su = ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), eta)
        h_ = -sd.log() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = denoiser(x_2, sigma_s_1 * s_in)

        sd, su = ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), eta)
        h_ = -sd.log() - lambda_s
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@register("dpmpp_2m_sde", noise=NoiseKind.BROWNIAN)
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the midpoint correction, k-diffusion `sample_dpmpp_2m_sde`."""
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
        else:
            lambda_s, lambda_t = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / (h_last / h)) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                fresh = noise(sigmas[i], sigmas[i + 1])
                x = x + fresh * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x
