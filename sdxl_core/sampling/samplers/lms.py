"""Linear multistep (lms)."""

from __future__ import annotations

import torch

from ._math import derivative
from ._registry import register

_GAUSS_LEGENDRE_3 = ((-(0.6**0.5), 5 / 9), (0.0, 8 / 9), (0.6**0.5, 5 / 9))


def _lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i-j (k-diffusion
    `linear_multistep_coeff`), by Gauss-Legendre quadrature, exact for these degree <= 3 polynomials (ComfyUI
    integrates with scipy's adaptive quad: the two agree within a few 1e-7)."""
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    a, b = sigmas[i], sigmas[i + 1]
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * basis(mid + half * node) for node, w in _GAUSS_LEGENDRE_3)


@register("lms")
@torch.no_grad()
def sample_lms(denoiser, x, sigmas, loop, *, order=4):
    """Linear multistep (Adams-Bashforth in sigma) of order <= 4, k-diffusion `sample_lms` (Karras et al. 2022)."""
    s_in = x.new_ones([x.shape[0]])
    # ComfyUI integrates over the float32 grid's values.
    grid = sigmas.detach().cpu().float().tolist()
    derivatives = []
    for i in loop.steps(sigmas):
        denoised = denoiser(x, sigmas[i] * s_in)
        derivatives = (derivatives + [derivative(x, sigmas[i], denoised)])[-order:]
        loop.report(i, x, sigmas[i], denoised)
        if grid[i + 1] == 0:
            x = denoised
        else:
            current = min(i + 1, order)
            coefficients = [_lms_coefficient(current, grid, i, j) for j in range(current)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))
    return x
