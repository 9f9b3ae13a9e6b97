"""UniPC (Zhao et al. 2023, arXiv 2302.04867): the unified multistep predictor-corrector in data prediction, with
the B(h) = h (bh1) and B(h) = e^h - 1 (bh2) variants, as ComfyUI runs it (`comfy/extra_samplers/uni_pc.py`).

It works in the variance-preserving frame of a discrete model: x_vp = x / sqrt(1 + sigma^2), alpha = 1 / sqrt(1 +
sigma^2), std = sigma * alpha, lambda = log(alpha / std). The step to sigma 0 is taken to sigma 0.001 instead
(lambda is finite there), and the result is scaled back by that alpha. Order 3 (lower on the first steps and the
last ones), the corrector after every step but the last; the corrector's evaluation is reused by the next step.
"""

from __future__ import annotations

import torch

from ._registry import register

_LAST_SIGMA = 0.001  # ComfyUI's stand-in for a final sigma of 0


def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _per_item(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v[(...,) + (None,) * (ndim - 1)]


class _DataPrediction:
    """x_vp, sigma -> x0 through the VE denoiser, by way of eps as ComfyUI's wrapper computes it."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x_vp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(sigma.shape[:1] + (1,) * (x_vp.ndim - 1))
        x = x_vp * ((s**2 + 1.0) ** 0.5)
        eps = (x - self.denoiser(x, sigma)) / s
        return (x_vp - _per_item(_std(sigma), x_vp.ndim) * eps) / _per_item(_alpha(sigma), x_vp.ndim)


def _update(model, x, x0_history, t_history, t, order, variant, use_corrector):
    """One UniPC step from t_history[-1] to t with `order` earlier x0s: the UniP predictor, then (if asked) the UniC
    corrector with the model evaluated at the predicted state; returns (x, that evaluation or None)."""
    ndim = x.ndim
    t_prev = t_history[-1]
    lambda_prev, lambda_t = _lambda(t_prev), _lambda(t)
    x0_prev = x0_history[-1]
    std_prev, std_t = _std(t_prev), _std(t)
    alpha_t = torch.exp(_log_alpha(t))
    h = lambda_t - lambda_prev

    ratios, differences = [], []
    for k in range(1, order):
        rk = ((_lambda(t_history[-(k + 1)]) - lambda_prev) / h)[0]
        ratios.append(rk)
        differences.append((x0_history[-(k + 1)] - x0_prev) / rk)
    ratios.append(1.0)
    ratios = torch.tensor(ratios, dtype=x.dtype, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    powers, b = [], []
    for k in range(1, order + 1):
        powers.append(torch.pow(ratios, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    powers = torch.stack(powers)
    b = torch.tensor(b, dtype=x.dtype, device=x.device)

    stacked = torch.stack(differences, dim=1) if differences else None
    x_base = _per_item(std_t / std_prev, ndim) * x - _per_item(alpha_t * h_phi_1, ndim) * x0_prev
    x_t = x_base
    if stacked is not None:
        if order == 2:
            rhos_p = torch.tensor([0.5], dtype=x.dtype, device=x.device)
        else:
            rhos_p = torch.linalg.solve(powers[:-1, :-1], b[:-1])
        x_t = x_base - _per_item(alpha_t * b_h, ndim) * torch.tensordot(stacked, rhos_p, dims=([1], [0]))
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device) if order == 1 else torch.linalg.solve(powers, b)
    x0_t = model(x_t, t)
    correction = rhos_c[-1] * (x0_t - x0_prev)
    if stacked is not None:
        correction = torch.tensordot(stacked, rhos_c[:-1], dims=([1], [0])) + correction
    return x_base - _per_item(alpha_t * b_h, ndim) * correction, x0_t


def _sample_unipc(denoiser, x, sigmas, loop, variant):
    grid = sigmas.clone()
    if float(grid[-1]) == 0:
        grid[-1] = _LAST_SIGMA
    model = _DataPrediction(denoiser)
    x = x / torch.sqrt(1.0 + grid[0] ** 2.0)
    steps = len(grid) - 1
    order = min(3, steps - 1)
    batch = x.shape[0]
    x0_history: list[torch.Tensor] = []
    t_history: list[torch.Tensor] = []
    for index in loop.steps(grid):
        if index == 0:
            t = grid[0].expand(batch)
            x0_history, t_history = [model(x, t)], [t]
        elif index < order:
            t = grid[index].expand(batch)
            x, x0 = _update(model, x, x0_history, t_history, t, index, variant, use_corrector=True)
            x0_history.append(model(x, t) if x0 is None else x0)
            t_history.append(t)
        else:
            # The last index also takes the final step, so that `steps` updates are made in all.
            for step in range(index, index + 1 + (index == steps - 1)):
                t = grid[step].expand(batch)
                step_order = min(order, steps + 1 - step)
                x, x0 = _update(model, x, x0_history, t_history, t, step_order, variant,
                                use_corrector=step != steps)
                # The histories hold `order` entries here: drop the oldest (the newest x0 is replaced below).
                t_history = t_history[1:] + [t]
                x0_history = x0_history[1:] + [x0_history[-1]]
                if step < steps:
                    x0_history[-1] = model(x, t) if x0 is None else x0
        # ComfyUI's x here is the VP state at the newest time; report it in the sampler's own (VE) scaling.
        t_now = t_history[-1][:1]
        loop.report(index, x / _per_item(_alpha(t_now), x.ndim), t_now[0], x0_history[-1])
    return x / _alpha(grid[-1])


@register("uni_pc")
@torch.no_grad()
def sample_uni_pc(denoiser, x, sigmas, loop):
    """UniPC with B(h) = h (ComfyUI's "uni_pc")."""
    return _sample_unipc(denoiser, x, sigmas, loop, "bh1")


@register("uni_pc_bh2")
@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, loop):
    """UniPC with B(h) = e^h - 1 (ComfyUI's "uni_pc_bh2")."""
    return _sample_unipc(denoiser, x, sigmas, loop, "bh2")
