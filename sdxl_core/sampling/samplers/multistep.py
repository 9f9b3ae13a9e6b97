"""Explicit multistep samplers on the probability-flow ODE in sigma that reuse the slopes of earlier steps: ipndm,
ipndm_v (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", improved PNDM; as in
zju-pi/diff-sampler) and deis (the same paper's time-based AB coefficients).

Every sampler keeps the last `max_order - 1` slopes d = (x - x0) / sigma, takes an Euler step first and x0 on a
step to sigma 0.
"""

from __future__ import annotations

import math

import torch

from ._math import zero_flags
from ._registry import register


def _remember(history: list, d: torch.Tensor, max_order: int) -> None:
    """Keep the newest max_order - 1 slopes."""
    history.append(d)
    if len(history) > max_order - 1:
        del history[: len(history) - (max_order - 1)]


@register("ipndm")
@torch.no_grad()
def sample_ipndm(denoiser, x, sigmas, loop, *, max_order=4):
    """Improved PNDM: Adams-Bashforth of order <= 4 with equal-step weights whatever the grid's spacing."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    history: list[torch.Tensor] = []  # earlier slopes, oldest first
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        loop.report(i, x, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        order = min(max_order, i + 1)
        dt = sigmas[i + 1] - sigmas[i]
        if zero[i + 1]:
            x_next = denoised
        elif order == 1:
            x_next = x + dt * d
        else:
            # Adams-Bashforth for equal steps, integer weights over one denominator (newest slope first).
            if order == 2:
                combined, denominator = 3 * d - history[-1], 2
            elif order == 3:
                combined, denominator = 23 * d - 16 * history[-1] + 5 * history[-2], 12
            else:
                combined = 55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]
                denominator = 24
            x_next = x + dt * combined / denominator
        _remember(history, d, max_order)
        x = x_next
    return x


@register("ipndm_v")
@torch.no_grad()
def sample_ipndm_v(denoiser, x, sigmas, loop, *, max_order=4):
    """Improved PNDM with variable-step Adams-Bashforth weights from the grid's own spacing (order <= 4)."""
    s_in = x.new_ones([x.shape[0]])
    zero = zero_flags(sigmas)
    history: list[torch.Tensor] = []
    for i in loop.steps(sigmas):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, t_cur * s_in)
        loop.report(i, x, t_cur, denoised)
        d = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if zero[i + 1]:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d
        else:
            h_n = t_next - t_cur
            h_1 = t_cur - sigmas[i - 1]
            first = (2 + (h_n / h_1)) / 2
            second = -(h_n / h_1) / 2
            if order == 2:
                slope = first * d + second * history[-1]
            else:
                h_2 = sigmas[i - 1] - sigmas[i - 2]
                # The third-order correction: the AB3 term for unequal steps.
                t1 = (1 - h_n / (3 * (h_n + h_1)) * (h_n * (h_n + h_1)) / (h_1 * (h_1 + h_2))) / 2
                if order == 3:
                    c1 = first + t1
                    c2 = second - (1 + h_1 / h_2) * t1
                    c3 = t1 * h_1 / h_2
                    slope = c1 * d + c2 * history[-1] + c3 * history[-2]
                else:
                    h_3 = sigmas[i - 2] - sigmas[i - 3]
                    ratio = h_1 * (h_1 + h_2) / (h_2 * (h_2 + h_3))
                    t2 = ((1 - h_n / (3 * (h_n + h_1))) / 2 + (1 - h_n / (2 * (h_n + h_1))) * h_n
                          / (6 * (h_n + h_1 + h_2))) \
                        * (h_n * (h_n + h_1) * (h_n + h_1 + h_2)) / (h_1 * (h_1 + h_2) * (h_1 + h_2 + h_3))
                    c1 = first + t1 + t2
                    c2 = second - (1 + h_1 / h_2) * t1 - (1 + (h_1 / h_2) + ratio) * t2
                    c3 = t1 * h_1 / h_2 + ((h_1 / h_2) + ratio * (1 + h_2 / h_3)) * t2
                    c4 = -t2 * ratio * h_1 / h_2
                    slope = c1 * d + c2 * history[-1] + c3 * history[-2] + c4 * history[-3]
            x_next = x + (t_next - t_cur) * slope
        _remember(history, d, max_order)
        x = x_next
    return x


# DEIS maps sigma to the time of a VP SDE with linear beta fitted to EDM's range (Zhang & Chen 2023, and
# zju-pi/diff-sampler's `edm2t`, whose constants ComfyUI keeps for every model).
_DEIS_EPSILON, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0
_DEIS_POINTS = 10000  # the Riemann sum's points per step, as ComfyUI's "tab" mode integrates


def _deis_times(sigmas: list[float]) -> tuple[list[float], float, float]:
    """(t per sigma, beta_0, beta_1) of the linear-beta VP SDE with alpha_bar(t) = exp(-beta_0 t - (beta_1 -
    beta_0) t^2 / 2) and 1 + sigma^2 = 1 / alpha_bar, its ends at (epsilon, sigma_min) and (1, sigma_max)."""
    log_min, log_max = math.log1p(_DEIS_SIGMA_MIN**2), math.log1p(_DEIS_SIGMA_MAX**2)
    beta_d = 2 * (log_min / _DEIS_EPSILON - log_max) / (_DEIS_EPSILON - 1)
    beta_min = log_max - 0.5 * beta_d
    times = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(s * s)) - beta_min) / beta_d for s in sigmas]
    return times, beta_min, beta_d + beta_min


def _deis_coefficients(sigmas: list[float], max_order: int) -> list[list[float]]:
    """Per step, the integrals over [t_i, t_{i+1}] of the eps-to-sigma weight times each Lagrange basis polynomial
    through the last `order` times (DEIS "tab"), by ComfyUI's Riemann sum, in float64."""
    times, beta_0, beta_1 = _deis_times(sigmas)
    coefficients = []
    for i in range(len(times) - 1):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        t_cur, t_next = times[i], times[i + 1]
        taus = torch.linspace(t_cur, t_next, _DEIS_POINTS, dtype=torch.float64)
        alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
        # d log alpha / d tau, which ComfyUI takes by autograd.
        d_log_alpha = -(taus * (beta_1 - beta_0) + beta_0)
        weight = -0.5 * d_log_alpha / torch.sqrt(alpha * (1 - alpha))
        nodes = [times[i - k] for k in range(order)]
        step = []
        for j in range(order):
            basis = torch.ones_like(taus)
            for k, node in enumerate(nodes):
                if k != j:
                    basis = basis * (taus - node) / (nodes[j] - node)
            step.append(float(torch.sum(weight * basis)) * (t_next - t_cur) / _DEIS_POINTS)
        coefficients.append(step)
    return coefficients


@register("deis")
@torch.no_grad()
def sample_deis(denoiser, x, sigmas, loop, *, max_order=3):
    """DEIS (Zhang & Chen 2023, arXiv 2204.13902), the "tAB" exponential integrator of order <= max_order: the
    slope is extrapolated by a Lagrange polynomial in the VP time through the last steps and integrated against
    the schedule's weight; Euler on the first step and the step to 0."""
    if not 1 <= max_order <= 4:
        raise ValueError(f"deis max_order must be 1..4, got {max_order}")
    s_in = x.new_ones([x.shape[0]])
    grid = sigmas.detach().cpu().tolist()
    coefficients = _deis_coefficients(grid, max_order)
    history: list[torch.Tensor] = []
    for i in loop.steps(sigmas):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, t_cur * s_in)
        loop.report(i, x, t_cur, denoised)
        d = (x - denoised) / t_cur
        order = 1 if grid[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (t_next - t_cur) * d
        else:
            x_next = x + coefficients[i][0] * d
            for coefficient, older in zip(coefficients[i][1:], reversed(history)):
                x_next = x_next + coefficient * older
        _remember(history, d, max_order)
        x = x_next
    return x
