"""DPM-Solver++ samplers (Lu et al. 2022, arXiv 2211.01095): the single-step 2S (ancestral), the multistep 2M and
3M, their SDE forms over Brownian-tree noise (on the CPU, or on the latent's device for the `_gpu` names), and the
CFG++ forms (Chung et al. 2024, arXiv 2406.08070) that step with the unconditional prediction.

Time is lambda = log(alpha/sigma) = -log(sigma) in the VE parameterisation of a discrete (eps or v) model.
"""

from __future__ import annotations

import torch

from ._math import ancestral_lands_on_zero, ancestral_step, derivative, lambda_of, sigma_of, zero_flags
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
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = t_next - t
        if old_denoised is not None and not zero[i + 1]:
            r = (t - lambda_of(sigmas[i - 1])) / h
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
        lambda_s, lambda_t = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = (-lambda_s_1).exp()
        alpha_s, alpha_t = sigmas[i] * lambda_s.exp(), sigmas[i + 1] * lambda_t.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()

        sd, su = ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), eta)
        h_ = lambda_of(sd) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = denoiser(x_2, sigma_s_1 * s_in)

        sd, su = ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), eta)
        h_ = lambda_of(sd) - lambda_s
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@register("dpmpp_sde_gpu", noise=NoiseKind.BROWNIAN_DEVICE)
@torch.no_grad()
def sample_dpmpp_sde_gpu(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0, r=0.5):
    """dpmpp_sde over a Brownian tree on the latent's device."""
    return sample_dpmpp_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, r=r)


def _dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0, solver="midpoint"):
    """DPM-Solver++(2M) SDE, k-diffusion `sample_dpmpp_2m_sde`: the exponential-integrator step of the SDE with
    noise fraction eta, plus a second-order correction from the previous x0 by the midpoint or Heun rule."""
    if solver not in ("midpoint", "heun"):
        raise ValueError(f"solver must be 'midpoint' or 'heun', got {solver!r}")
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                fresh = noise(sigmas[i], sigmas[i + 1])
                x = x + fresh * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@register("dpmpp_2m_sde", noise=NoiseKind.BROWNIAN)
@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the midpoint correction."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, solver="midpoint")


@register("dpmpp_2m_sde_gpu", noise=NoiseKind.BROWNIAN_DEVICE)
@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """dpmpp_2m_sde over a Brownian tree on the latent's device."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, solver="midpoint")


@register("dpmpp_2m_sde_heun", noise=NoiseKind.BROWNIAN)
@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the Heun correction."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, solver="heun")


@register("dpmpp_2m_sde_heun_gpu", noise=NoiseKind.BROWNIAN_DEVICE)
@torch.no_grad()
def sample_dpmpp_2m_sde_heun_gpu(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """dpmpp_2m_sde_heun over a Brownian tree on the latent's device."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise, solver="heun")


def _dpmpp_3m_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE, k-diffusion `sample_dpmpp_3m_sde`: the 2M SDE step with first and second divided
    differences of the last three x0 predictions (second order on the second step, first on the first)."""
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                fresh = noise(sigmas[i], sigmas[i + 1])
                x = x + fresh * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@register("dpmpp_3m_sde", noise=NoiseKind.BROWNIAN)
@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE over a Brownian tree on the CPU."""
    return _dpmpp_3m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise)


@register("dpmpp_3m_sde_gpu", noise=NoiseKind.BROWNIAN_DEVICE)
@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE over a Brownian tree on the latent's device."""
    return _dpmpp_3m_sde(denoiser, x, sigmas, loop, noise, eta=eta, s_noise=s_noise)


@register("dpmpp_2s_ancestral", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """Ancestral DPM-Solver++(2S), k-diffusion `sample_dpmpp_2s_ancestral`: a deterministic second-order step
    (midpoint in lambda) to sigma_down, then fresh noise of std sigma_up; Euler where sigma_down is 0."""
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = ancestral_lands_on_zero(sigmas, eta)
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        loop.report(i, x, sigmas[i], denoised)
        if lands_on_zero[i]:
            x = x + derivative(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = lambda_of(sigmas[i]), lambda_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_of(s) / sigma_of(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = denoiser(x_2, sigma_of(s) * s_in)
            x = (sigma_of(t_next) / sigma_of(t)) * x - (-h).expm1() * denoised_2
        if not zero[i + 1]:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@register("dpmpp_2s_ancestral_cfg_pp", noise=NoiseKind.GAUSSIAN, uncond=True)
@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0):
    """dpmpp_2s_ancestral with CFG++ (k-diffusion `sample_dpmpp_2s_ancestral_cfg_pp`): the state is renoised along
    the unconditional prediction, so x + (x0 - uncond_x0) replaces x in each update."""
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = ancestral_lands_on_zero(sigmas, eta)
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised, uncond = denoiser(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        loop.report(i, x, sigmas[i], denoised)
        if lands_on_zero[i]:
            x = denoised + derivative(x, sigmas[i], uncond) * sigma_down
        else:
            t, t_next = lambda_of(sigmas[i]), lambda_of(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_of(s) / sigma_of(t)) * (x + (denoised - uncond)) - (-h * 0.5).expm1() * denoised
            denoised_2, uncond = denoiser(x_2, sigma_of(s) * s_in)
            # ComfyUI's update reads the unconditional prediction of the latest call, the midpoint's.
            x = (sigma_of(t_next) / sigma_of(t)) * (x + (denoised - uncond)) - (-h).expm1() * denoised_2
        if not zero[i + 1]:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@register("dpmpp_2m_cfg_pp", uncond=True)
@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(denoiser, x, sigmas, loop):
    """DPM-Solver++(2M) with CFG++ (k-diffusion `sample_dpmpp_2m_cfg_pp`): the exponential step moves along the
    unconditional prediction and lands on the guided one; the multistep correction differences the guided x0
    against the previous unconditional one."""
    s_in = x.new_ones([x.shape[0]])
    old_uncond = None
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised, uncond = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        t, t_next = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = t_next - t
        if old_uncond is None or zero[i + 1]:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t - lambda_of(sigmas[i - 1])) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x
