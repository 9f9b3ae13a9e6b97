"""Samplers as plain functions over a denoiser, k-diffusion style, under ComfyUI's KSampler names.

Every sampler has the signature `sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, cancel=None, seed=None) -> x` where `denoiser(x, sigma, **extra_args) -> x0`, `x` is the
already noised start (see `noise.noise_scaling`) and `sigmas` a descending grid. The update rules follow ComfyUI's
`comfy/k_diffusion/sampling.py` operation for operation, so deterministic samplers give ComfyUI's numbers.
Stochastic ones take their noise from `noise_sampler(sigma, sigma_next)` or, when none is given, from a sampler
seeded with `seed`; deterministic samplers accept and ignore both so one call site can drive any of them.

Parity with ComfyUI (tests compare against ComfyUI's own code when COMFYUI_PATH names a checkout):
- bit-equal: euler, euler_ancestral (its default noise too: ComfyUI's generator seeded with the KSampler seed on
  x's device), heun, dpm_2, dpmpp_2m, ddim (ComfyUI runs `sample_euler` for it);
- dpmpp_sde, dpmpp_2m_sde: bit-equal too, default noise included: `noise.BrownianTreeNoiseSampler` over
  [min positive sigma, max sigma] seeded with the KSampler seed reproduces ComfyUI's torchsde Brownian tree;
- lms: within a few 1e-7 (ComfyUI integrates the multistep coefficients with scipy quad on float32 values, this
  module exactly).
Churn (s_churn) is not offered: ComfyUI's KSampler never sets it and its noise would come from the global RNG.

`callback` receives `{"i", "x", "sigma", "sigma_hat", "denoised"}` once per step; `cancel()` is polled before
each step and a true result raises `SamplingCancelled`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .noise import BrownianTreeNoiseSampler, GaussianNoiseSampler, NoiseSampler, is_max_denoise, noise_scaling

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict], None]
Cancel = Callable[[], bool]


class SamplingCancelled(Exception):
    """Raised between steps when the caller's `cancel()` returned true."""

    def __init__(self, step: int, total: int):
        super().__init__(f"sampling cancelled before step {step + 1} of {total}")
        self.step = step
        self.total = total


def _grid_length(sigmas: torch.Tensor) -> int:
    if sigmas.ndim != 1:
        raise ValueError(f"expected a 1-D sigma grid, got shape {tuple(sigmas.shape)}")
    return len(sigmas)


def _zero_flags(sigmas: torch.Tensor) -> list[bool]:
    """Which grid entries are 0, read once per run: branching on `sigmas[i + 1] == 0` in the loop would make every
    step on a GPU wait for the previous one to finish (a device-to-host read)."""
    return [value == 0 for value in sigmas.detach().cpu().tolist()]


def _steps(sigmas: torch.Tensor, cancel: Cancel | None) -> Iterator[int]:
    total = _grid_length(sigmas) - 1
    for i in range(total):
        if cancel is not None and cancel():
            raise SamplingCancelled(i, total)
        yield i


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _derivative(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE, Karras et al. (2022) eq. 4 (k-diffusion `to_d`)."""
    return (x - denoised) / sigma[(...,) + (None,) * x.ndim]


def _ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up (k-diffusion
    `get_ancestral_step`)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    # torch.minimum, not min(): the same value without reading the comparison back to the host.
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _ancestral_lands_on_zero(sigmas: torch.Tensor, eta: float) -> list[bool]:
    """Whether each step's sigma_down is 0 (then the step returns x0), for the whole grid at once on the CPU: the
    same elementwise float ops as the per-step values, without a device read per step."""
    grid = sigmas.detach().cpu()
    if len(grid) < 2:
        return []
    return (_ancestral_step(grid[:-1], grid[1:], eta)[0] == 0).tolist()


def _check_seeded(noise_sampler: NoiseSampler | None, seed: int | Sequence[int] | None, sampler: str) -> None:
    if noise_sampler is None and seed is None:
        raise ValueError(f"{sampler} is stochastic: pass seed= (or a noise_sampler) so the run is reproducible")


def _gaussian_noise(x: torch.Tensor, noise_sampler: NoiseSampler | None, seed: int | None,
                    sampler: str) -> NoiseSampler:
    _check_seeded(noise_sampler, seed, sampler)
    return GaussianNoiseSampler(x, seed) if noise_sampler is None else noise_sampler


def _brownian_noise(x: torch.Tensor, sigmas: torch.Tensor, noise_sampler: NoiseSampler | None,
                    seed: int | Sequence[int] | None, sampler: str) -> NoiseSampler:
    """ComfyUI's default for the SDE samplers: a Brownian tree over [smallest positive sigma, largest sigma] seeded
    with the KSampler seed (or one tree per batch item for a sequence of seeds)."""
    _check_seeded(noise_sampler, seed, sampler)
    if noise_sampler is not None:
        return noise_sampler
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        raise ValueError(f"{sampler} needs a positive sigma in its grid, got {sigmas.tolist()}")
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed)


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None, seed=None):
    """Euler steps on the probability-flow ODE, Karras et al. (2022) Algorithm 2 without churn."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        d = _derivative(x, sigmas[i], denoised)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None,
                           seed=None, eta=1.0, s_noise=1.0):
    """Ancestral Euler (k-diffusion `sample_euler_ancestral`): Euler to sigma_down, then noise of std sigma_up."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _gaussian_noise(x, noise_sampler, seed, "euler_ancestral")
    s_in = x.new_ones([x.shape[0]])
    lands_on_zero = _ancestral_lands_on_zero(sigmas, eta)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        sigma_down, sigma_up = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, x, sigmas[i], denoised)
        if lands_on_zero[i]:
            x = denoised
        else:
            d = _derivative(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None, seed=None):
    """Heun's second-order method, Karras et al. (2022) Algorithm 2 without churn; Euler on the last step to 0."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    zero = _zero_flags(sigmas)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        d = _derivative(x, sigmas[i], denoised)
        _report(callback, i, x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if zero[i + 1]:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _derivative(x_2, sigmas[i + 1], denoiser(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None, seed=None):
    """DPM-Solver-2 (Lu et al. 2022) as a midpoint method in log sigma, k-diffusion `sample_dpm_2`."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    zero = _zero_flags(sigmas)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        d = _derivative(x, sigmas[i], denoised)
        _report(callback, i, x, sigmas[i], denoised)
        if zero[i + 1]:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _derivative(x_2, sigma_mid, denoiser(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def _lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node i-j (k-diffusion
    `linear_multistep_coeff`), by Gauss-Legendre quadrature, exact for these degree <= 3 polynomials."""
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    a, b = sigmas[i], sigmas[i + 1]
    half, mid = (b - a) / 2, (a + b) / 2
    return half * sum(w * basis(mid + half * node) for node, w in _GAUSS_LEGENDRE_3)


_GAUSS_LEGENDRE_3 = ((-(0.6**0.5), 5 / 9), (0.0, 8 / 9), (0.6**0.5, 5 / 9))


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None, seed=None,
               order=4):
    """Linear multistep (Adams-Bashforth in sigma) of order <= 4, k-diffusion `sample_lms` (Karras et al. 2022)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    # ComfyUI integrates over the float32 grid's values.
    grid = sigmas.detach().cpu().float().tolist()
    derivatives = []
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        derivatives = (derivatives + [_derivative(x, sigmas[i], denoised)])[-order:]
        _report(callback, i, x, sigmas[i], denoised)
        if grid[i + 1] == 0:
            x = denoised
        else:
            current = min(i + 1, order)
            coefficients = [_lms_coefficient(current, grid, i, j) for j in range(current)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None,
                    seed=None):
    """DPM-Solver++(2M), Lu et al. (2022) arXiv 2211.01095 Algorithm 2; first-order on the first and last step."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    zero = _zero_flags(sigmas)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
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


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None,
                     seed=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, second order with a midpoint at ratio r), k-diffusion `sample_dpmpp_sde`."""
    extra_args = {} if extra_args is None else extra_args
    if _grid_length(sigmas) <= 1:
        return x
    noise_sampler = _brownian_noise(x, sigmas, noise_sampler, seed, "dpmpp_sde")
    s_in = x.new_ones([x.shape[0]])
    zero = _zero_flags(sigmas)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
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

        sd, su = _ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), eta)
        h_ = -sd.log() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = denoiser(x_2, sigma_s_1 * s_in, **extra_args)

        sd, su = _ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), eta)
        h_ = -sd.log() - lambda_s
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None,
                        seed=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE with the midpoint correction, k-diffusion `sample_dpmpp_2m_sde` (Lu et al. 2022)."""
    extra_args = {} if extra_args is None else extra_args
    if _grid_length(sigmas) <= 1:
        return x
    noise_sampler = _brownian_noise(x, sigmas, noise_sampler, seed, "dpmpp_2m_sde")
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h, h_last = None, None, None
    zero = _zero_flags(sigmas)
    for i in _steps(sigmas, cancel):
        denoised = denoiser(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
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
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, cancel=None, seed=None):
    """DDIM (Song et al. 2021) with eta 0, which is the Euler step in sigma; ComfyUI's "ddim" runs `sample_euler`."""
    return sample_euler(denoiser, x, sigmas, extra_args=extra_args, callback=callback, cancel=cancel)


Sampler = Callable[..., torch.Tensor]

# ComfyUI's KSampler sampler names this core implements.
SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "lms": sample_lms,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ddim": sample_ddim,
}

# Samplers whose results depend on a seed; the others ignore `seed` and `noise_sampler`.
STOCHASTIC_SAMPLERS = frozenset({"euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde"})


def get_sampler(name: str) -> Sampler:
    """A sampler by its ComfyUI name."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


def run_sampler(
    name: str,
    denoiser: Denoiser,
    latent: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sigma_max: torch.Tensor | float,
    seed: int | None = None,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    cancel: Cancel | None = None,
) -> torch.Tensor:
    """One KSampler run on an eps model (ComfyUI `KSAMPLER.sample`): the noise is scaled onto the latent at
    sigmas[0] (`noise.noise_scaling`, pure noise when sigmas[0] is the schedule's sigma_max), then the sampler runs;
    an empty grid returns the latent unchanged. `seed` is the KSampler seed, which ComfyUI also hands to the
    stochastic samplers' noise; `latent` is in the model's (scaled) latent space."""
    sampler = get_sampler(name)
    if noise.shape != latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(latent.shape)}")
    if sigmas.numel() == 0:
        return latent
    max_denoise = is_max_denoise(sigmas, sigma_max)  # one read of the grid per run, before it moves
    noise = noise.to(device=latent.device)
    sigmas = sigmas.to(device=latent.device)
    x = noise_scaling(sigmas[0], noise, latent, max_denoise)
    return sampler(denoiser, x, sigmas, extra_args=extra_args, callback=callback, cancel=cancel, seed=seed)
