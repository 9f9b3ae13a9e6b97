"""The original DPM-Solver (Lu et al. 2022, arXiv 2206.00927) on eps in time t = -log(sigma): dpm_fast (fixed
steps of orders 3, 3, ..., 2, 1 spread evenly in t) and dpm_adaptive (embedded orders 2/3 with PID step-size
control). As in ComfyUI both integrate from sigmas[0] down to the grid's smallest positive sigma and return the
state there (not x0), and neither uses the grid's other sigmas; both run deterministically (eta 0)."""

from __future__ import annotations

import math

import torch

from ._math import lambda_of, sigma_of
from ._registry import register


class _EpsCache:
    """The eps predictions of one step, each evaluated once (k-diffusion `DPMSolver.eps` with its cache)."""

    def __init__(self, denoiser, x: torch.Tensor):
        self.denoiser = denoiser
        self.s_in = x.new_ones([x.shape[0]])
        self.values: dict[str, torch.Tensor] = {}
        self.denoised: torch.Tensor | None = None

    def eps(self, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in self.values:
            x0 = self.denoiser(x, sigma_of(t) * self.s_in)
            if key == "eps":
                self.denoised = x0
            self.values[key] = (x - x0) / sigma_of(t)
        return self.values[key]


def _step_1(cache: _EpsCache, x, t, t_next):
    h = t_next - t
    return x - sigma_of(t_next) * h.expm1() * cache.eps("eps", x, t)


def _step_2(cache: _EpsCache, x, t, t_next, r1=1 / 2):
    h = t_next - t
    eps = cache.eps("eps", x, t)
    s1 = t + r1 * h
    u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
    eps_r1 = cache.eps("eps_r1", u1, s1)
    return x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)


def _step_3(cache: _EpsCache, x, t, t_next, r1=1 / 3, r2=2 / 3):
    h = t_next - t
    eps = cache.eps("eps", x, t)
    s1, s2 = t + r1 * h, t + r2 * h
    u1 = x - sigma_of(s1) * (r1 * h).expm1() * eps
    eps_r1 = cache.eps("eps_r1", u1, s1)
    u2 = (x - sigma_of(s2) * (r2 * h).expm1() * eps
          - sigma_of(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
    eps_r2 = cache.eps("eps_r2", u2, s2)
    return x - sigma_of(t_next) * h.expm1() * eps - sigma_of(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _end_sigma(sigmas: torch.Tensor) -> torch.Tensor:
    """The smallest positive sigma of the grid, where ComfyUI's wrappers stop these solvers."""
    return sigmas[-2] if float(sigmas[-1]) == 0 else sigmas[-1]


@register("dpm_fast")
@torch.no_grad()
def sample_dpm_fast(denoiser, x, sigmas, loop):
    """DPM-Solver-fast with len(sigmas) - 1 model evaluations (the paper's §3.4 order schedule)."""
    nfe = len(sigmas) - 1
    sigma_end = _end_sigma(sigmas)
    if float(sigma_end) <= 0 or float(sigmas[0]) <= 0:
        raise ValueError(f"dpm_fast needs positive first and last sigmas, got {sigmas.tolist()}")
    t_start, t_end = lambda_of(sigmas[0].clone()), lambda_of(sigma_end.clone())
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    steps = {1: _step_1, 2: _step_2, 3: _step_3}
    for i in loop.count(len(orders)):
        cache = _EpsCache(denoiser, x)
        cache.eps("eps", x, ts[i])
        loop.report(i, x, sigma_of(ts[i]), cache.denoised)
        x = steps[orders[i]](cache, x, ts[i], ts[i + 1])
    return x


class _PIDStepSize:
    """PID control of the step size h (Söderlind 2003, as k-diffusion's `PIDStepSizeController`): the factor
    from the last three inverse errors, softened by 1 + atan(f - 1); a step is accepted when the factor is at
    least `accept_safety`."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []

    def propose(self, error: float) -> bool:
        inverse = 1 / (error + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        e0, e1, e2 = self.inverse_errors
        factor = 1 + math.atan(e0**self.b1 * e1**self.b2 * e2**self.b3 - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[2] = self.inverse_errors[1]
            self.inverse_errors[1] = self.inverse_errors[0]
        self.h *= factor
        return accept


@register("dpm_adaptive")
@torch.no_grad()
def sample_dpm_adaptive(denoiser, x, sigmas, loop, *, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0,
                        icoeff=1.0, dcoeff=0.0, accept_safety=0.81):
    """DPM-Solver-12/23 with adaptive steps: the error between the embedded lower- and higher-order solutions,
    scaled by atol + rtol |x|, drives the PID controller; runs until t reaches the grid's smallest sigma."""
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    sigma_end = _end_sigma(sigmas)
    if float(sigma_end) <= 0 or float(sigmas[0]) <= 0:
        raise ValueError(f"dpm_adaptive needs positive first and last sigmas, got {sigmas.tolist()}")
    t_end = lambda_of(sigma_end.clone())
    s = lambda_of(sigmas[0].clone())
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    x_prev = x
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, order, accept_safety)
    step = 0
    while s < t_end - 1e-5:
        loop.check(step)
        cache = _EpsCache(denoiser, x)
        t = torch.minimum(t_end, s + pid.h)
        cache.eps("eps", x, s)
        if order == 2:
            x_low, x_high = _step_1(cache, x, s, t), _step_2(cache, x, s, t)
        else:
            x_low, x_high = _step_2(cache, x, s, t, r1=1 / 3), _step_3(cache, x, s, t)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose(float(error)):
            x_prev, x, s = x_low, x_high, t
        loop.total = step + 1
        loop.report(step, x, sigma_of(s), cache.denoised)
        step += 1
    return x
