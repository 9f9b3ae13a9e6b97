"""Stochastic exponential solvers on the VP data-prediction SDE with Gaussian noise: er_sde (Cui et al. 2023,
arXiv 2309.06169, ER-SDE-Solver-3) and seeds_2 / seeds_3 (Gonzalez et al. 2023, arXiv 2305.14267, SEEDS).

Time is lambda = log(alpha/sigma) = -log(sigma) for a discrete (eps or v) model in the VE parameterisation.
"""

from __future__ import annotations

import torch

from ._math import lambda_of, sigma_of, zero_flags
from ._registry import NoiseKind, register


def _er_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    """The paper's default noise-scale function of the ER-SDE, x (e^(x^0.3) + 10)."""
    return x * ((x**0.3).exp() + 10.0)


_ER_INTEGRATION_POINTS = 200.0


@register("er_sde", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_er_sde(denoiser, x, sigmas, loop, noise, *, s_noise=1.0, max_stage=3):
    """ER-SDE-Solver-3 in the VP frame (k-diffusion `sample_er_sde`): the first-order step of the extended
    reverse-time SDE, with second and third stages from divided differences of earlier x0 predictions whose
    integrals are taken by a 200-point Riemann sum, then fresh noise with the SDE's std."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    points = torch.arange(0, _ER_INTEGRATION_POINTS, dtype=torch.float32, device=x.device)
    er_lambdas = lambda_of(sigmas).neg().exp()  # sigma / alpha
    old_denoised, old_denoised_d = None, None
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if zero[i + 1]:
            x = denoised
        else:
            er_s, er_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / er_s, sigmas[i + 1] / er_t
            scaler_t = _er_noise_scaler(er_t)
            r = scaler_t / _er_noise_scaler(er_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = er_t - er_s
                step = -dt / _ER_INTEGRATION_POINTS
                positions = er_t + points * step
                scaled = _er_noise_scaler(positions)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (er_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * scaler_t) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((positions - er_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((er_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * scaler_t) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                std = (er_t**2 - er_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * std
        old_denoised = denoised
    return x


def _ei_phi_1(h: torch.Tensor) -> torch.Tensor:
    """h phi_1(h) of the exponential integrators."""
    return torch.expm1(h)


def _ei_phi_2(h: torch.Tensor) -> torch.Tensor:
    """h phi_2(h) of the exponential integrators."""
    return (torch.expm1(h) - h) / h


@register("seeds_2", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_seeds_2(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0, r=0.5):
    """SEEDS-2 (k-diffusion `sample_seeds_2`): a stochastic exponential step to lambda_s + r h, a second evaluation
    there, and the full step with x0 blended towards it; the noise of the two segments is chained so that the full
    step sees one Brownian increment."""
    s_in = x.new_ones([x.shape[0]])
    inject = eta > 0 and s_noise > 0
    zero = zero_flags(sigmas)
    fac = 1 / (2 * r)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_1 = sigma_of(lambda_1)
        alpha_1 = sigma_1 * lambda_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = sigma_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_1 * _ei_phi_1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = denoiser(x_2, sigma_1 * s_in)

        denoised_d = torch.lerp(denoised, denoised_2, fac)
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _ei_phi_1(-h_eta) * denoised_d
        if inject:
            segment = (r - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@register("seeds_3", noise=NoiseKind.GAUSSIAN)
@torch.no_grad()
def sample_seeds_3(denoiser, x, sigmas, loop, noise, *, eta=1.0, s_noise=1.0, r_1=1.0 / 3, r_2=2.0 / 3):
    """SEEDS-3 (k-diffusion `sample_seeds_3`): three stages at lambda_s + r_1 h, lambda_s + r_2 h and lambda_t,
    the third-order exponential weights on the stage predictions, the stage noises chained."""
    s_in = x.new_ones([x.shape[0]])
    inject = eta > 0 and s_noise > 0
    zero = zero_flags(sigmas)
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_of(sigmas[i]), lambda_of(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_1, lambda_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_1, sigma_2 = sigma_of(lambda_1), sigma_of(lambda_2)
        alpha_1, alpha_2 = sigma_1 * lambda_1.exp(), sigma_2 * lambda_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()

        x_2 = sigma_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_1 * _ei_phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = denoiser(x_2, sigma_1 * s_in)

        a3_2 = r_2 / r_1 * _ei_phi_2(-r_2 * h_eta)
        a3_1 = _ei_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            segment = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_1, sigma_2)
            x_3 = x_3 + sde_noise * sigma_2 * s_noise
        denoised_3 = denoiser(x_3, sigma_2 * s_in)

        b3 = _ei_phi_2(-h_eta) / r_2
        b1 = _ei_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            segment = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x
