"""Pieces the sampler families share: the exponential solvers' time, the ODE derivative, the ancestral split and grid
flags read once per run."""

from __future__ import annotations

import torch


def lambda_of(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = -log(sigma), the time of the exponential solvers (DPM-Solver and its kin) for a
    discrete (eps or v) model in the VE parameterisation."""
    return sigma.log().neg()


def sigma_of(lam: torch.Tensor) -> torch.Tensor:
    """The sigma at time lambda (the inverse of `lambda_of`)."""
    return lam.neg().exp()


def derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, Karras et al. (2022) eq. 4 (k-diffusion `to_d`)."""
    return (x - denoised) / sigma[(...,) + (None,) * x.ndim]


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up (k-diffusion
    `get_ancestral_step`)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    # torch.minimum, not min(): the same value without reading the comparison back to the host.
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def zero_flags(sigmas: torch.Tensor) -> list[bool]:
    """Which grid entries are 0, read once per run: branching on `sigmas[i + 1] == 0` in the loop would make every
    step on a GPU wait for the previous one to finish (a device-to-host read)."""
    return [value == 0 for value in sigmas.detach().cpu().tolist()]


def ancestral_lands_on_zero(sigmas: torch.Tensor, eta: float) -> list[bool]:
    """Whether each step's sigma_down is 0 (then the step returns x0), for the whole grid at once on the CPU: the
    same elementwise float ops as the per-step values, without a device read per step."""
    grid = sigmas.detach().cpu()
    if len(grid) < 2:
        return []
    return (ancestral_step(grid[:-1], grid[1:], eta)[0] == 0).tolist()
