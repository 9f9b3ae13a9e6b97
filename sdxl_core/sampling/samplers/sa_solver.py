"""SA-Solver, the stochastic Adams predictor-corrector (Xue et al. 2023, arXiv 2309.05019, NeurIPS 2023), in data
prediction with lambda = -log(sigma) as time: sa_solver (predict, evaluate, correct) and sa_solver_pece (with a
second evaluation of the corrected state).
"""

from __future__ import annotations

import math

import torch

from ._registry import NoiseKind, register

# ComfyUI's default stochastic interval: tau = 1 between the sigmas at 20% and 80% of the schedule, 0 outside.
_TAU_START_PERCENT, _TAU_END_PERCENT = 0.2, 0.8


def _exponential_moments(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1 + tau^2) * integral_s^t e^((1 + tau^2)(x - t)) x^p dx for p = 0..order-1 (eq. 15 with e^((1+tau^2) t)
    taken out), by the integration-by-parts recursion written as one lower-triangular matrix."""
    growth = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    boundary = t**p - s**p * (-growth * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_weight = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_weight = log_weight - (depth * math.log(growth))
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_weight.exp() * signs).tril() @ boundary


def _adams_coefficients(sigma_next: torch.Tensor, lambdas: torch.Tensor, lambda_s: torch.Tensor,
                        lambda_t: torch.Tensor, tau: float) -> torch.Tensor:
    """The b_i of eqs. 15/18: the integrals of each Lagrange basis polynomial through `lambdas` against the
    exponential weight, from the moments by the transposed Vandermonde system, times alpha_t."""
    order = lambdas.shape[0]
    moments = _exponential_moments(lambda_s, lambda_t, order, tau)
    integrals = torch.linalg.solve(torch.vander(lambdas, order, increasing=True).T, moments)
    return sigma_next * lambda_t.exp() * integrals


def _sa_solver(denoiser, x, sigmas, loop, noise, schedule, *, s_noise, predictor_order, corrector_order,
               pece):
    s_in = x.new_ones([x.shape[0]])
    lambdas = sigmas.log().neg()
    start_sigma = schedule.percent_to_sigma(_TAU_START_PERCENT)
    end_sigma = schedule.percent_to_sigma(_TAU_END_PERCENT)
    grid = sigmas.detach().cpu().tolist()

    def tau_at(sigma: float) -> float:
        return 1.0 if start_sigma >= sigma >= end_sigma else 0.0

    keep = max(predictor_order, corrector_order)
    x_pred = x
    h, tau, fresh = 0.0, 0.0, 0.0
    predictions: list[torch.Tensor] = []
    lower_order_to_end = grid[-1] == 0
    last = len(grid) - 1
    for i in loop.steps(sigmas):
        denoised = denoiser(x_pred, sigmas[i] * s_in)
        loop.report(i, x_pred, sigmas[i], denoised)
        predictions = (predictions + [denoised])[-keep:]
        p_order = min(predictor_order, len(predictions))
        c_order = 0 if i == 0 or (grid[i + 1] == 0 and not pece) else min(corrector_order, len(predictions))
        if lower_order_to_end:
            p_order = min(p_order, last - 1 - i)
            c_order = min(c_order, last - i)

        if c_order == 0:
            x = x_pred
        else:
            b = _adams_coefficients(sigmas[i], lambdas[i - c_order + 1:i + 1], lambdas[i - 1], lambdas[i], tau)
            stacked = torch.stack(predictions[-c_order:], dim=1)
            x = sigmas[i] / sigmas[i - 1] * (-(tau**2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
            if tau > 0 and s_noise > 0:
                x = x + fresh  # the predictor's noise carries over into the corrected state
            if pece:
                denoised = denoiser(x, sigmas[i] * s_in)
                predictions[-1] = denoised

        if grid[i + 1] == 0:
            x = denoised
            continue
        tau = tau_at(grid[i + 1])
        b = _adams_coefficients(sigmas[i + 1], lambdas[i - p_order + 1:i + 1], lambdas[i], lambdas[i + 1], tau)
        stacked = torch.stack(predictions[-p_order:], dim=1)
        h = lambdas[i + 1] - lambdas[i]
        x_pred = sigmas[i + 1] / sigmas[i] * (-(tau**2) * h).exp() * x + torch.tensordot(stacked, b,
                                                                                        dims=([1], [0]))
        if tau > 0 and s_noise > 0:
            fresh = noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise
            x_pred = x_pred + fresh
    return x


@register("sa_solver", noise=NoiseKind.GAUSSIAN, schedule=True)
@torch.no_grad()
def sample_sa_solver(denoiser, x, sigmas, loop, noise, *, schedule, s_noise=1.0, predictor_order=3,
                     corrector_order=4):
    """SA-Solver, predictor order 3 and corrector order 4, stochastic (tau 1) over the middle of the schedule."""
    return _sa_solver(denoiser, x, sigmas, loop, noise, schedule, s_noise=s_noise, predictor_order=predictor_order,
                      corrector_order=corrector_order, pece=False)


@register("sa_solver_pece", noise=NoiseKind.GAUSSIAN, schedule=True)
@torch.no_grad()
def sample_sa_solver_pece(denoiser, x, sigmas, loop, noise, *, schedule, s_noise=1.0, predictor_order=3,
                          corrector_order=4):
    """SA-Solver in PECE mode: the corrected state is evaluated again and that prediction replaces the last."""
    return _sa_solver(denoiser, x, sigmas, loop, noise, schedule, s_noise=s_noise, predictor_order=predictor_order,
                      corrector_order=corrector_order, pece=True)
