"""The SDXL noise schedule and the step grids (schedulers) that ComfyUI's KSampler offers.

`DiscreteSchedule` is the 1000-step scaled-linear schedule of SDXL (sgm `LegacyDDPMDiscretization`, ComfyUI
`ModelSamplingDiscrete`), computed in float64 like sgm and ComfyUI and stored as float32 like ComfyUI. The
schedulers turn it into a descending sigma grid ending in 0; every one reproduces the ComfyUI function of the same
name (`comfy/samplers.py`, `comfy/k_diffusion/sampling.py`) operation for operation, so the grids are bit-equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import SDXL_NOISE_SCHEDULE, NoiseScheduleConfig

# Samplers for which ComfyUI's KSampler computes one extra step and drops the penultimate sigma
# (`KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS`).
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


class DiscreteSchedule:
    """The DDPM discrete schedule with scaled-linear betas (sgm `make_beta_schedule("linear")`, ComfyUI
    `ModelSamplingDiscrete`), as sigmas of the VE view every sampler works in."""

    def __init__(self, config: NoiseScheduleConfig = SDXL_NOISE_SCHEDULE):
        self.config = config
        num_timesteps, linear_start, linear_end = config.num_timesteps, config.linear_start, config.linear_end
        self.num_timesteps = num_timesteps
        # float64 as in sgm/ComfyUI; diffusers' float32 version differs by up to 1.3e-5 relative.
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        if config.zsnr:
            sigmas = zero_terminal_snr_sigmas(sigmas)
            self.alphas_cumprod = 1 / ((sigmas * sigmas) + 1)
        self.sigmas = sigmas.float()
        # The log is taken in float64 before the cast, as ComfyUI does; log(sigmas.float()) differs in the last bit.
        self.log_sigmas = sigmas.log().float()
        self._log_sigmas_by_device: dict[torch.device, torch.Tensor] = {self.log_sigmas.device: self.log_sigmas}

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        # Looking sigma up where it lives: a copy to the CPU would make every sampling step wait for the GPU.
        found = self._log_sigmas_by_device.get(device)
        if found is None:
            found = self._log_sigmas_by_device[device] = self.log_sigmas.to(device)
        return found

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the nearest training sigma in log space (ComfyUI `ModelSamplingDiscrete.timestep`)."""
        sigma = torch.as_tensor(sigma)
        distances = sigma.log() - self._log_sigmas_on(sigma.device)[:, None]
        return distances.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep, interpolated in log sigma (ComfyUI `ModelSamplingDiscrete.sigma`)."""
        timestep = torch.as_tensor(timestep)
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=self.num_timesteps - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(timestep.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the way through sampling (ComfyUI `ModelSamplingDiscrete.percent_to_sigma`)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()


# ComfyUI's stand-in for the last step's alpha_bar of a zero-terminal-SNR schedule: exactly 0 would make sigma
# infinite; this gives sigma_max ~ 4519.
ZSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1 on the sigmas (float64): sqrt(alpha_bar) shifted so the last step's is 0 and
    scaled so the first step's is unchanged, the last alpha_bar then set to ZSNR_LAST_ALPHA_BAR (ComfyUI
    `rescale_zero_terminal_snr_sigmas`)."""
    root = (1 / ((sigmas * sigmas) + 1)).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alpha_bar[-1] = ZSNR_LAST_ALPHA_BAR
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def normal_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Timesteps evenly spaced from the last to the first, log-sigma interpolated (ComfyUI "normal")."""
    _check_steps(steps)
    return _linspace_timestep_sigmas(schedule, steps, sgm=False)


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """`steps + 1` evenly spaced timesteps without the last (sgm discretization; ComfyUI "sgm_uniform")."""
    _check_steps(steps)
    return _linspace_timestep_sigmas(schedule, steps, sgm=True)


def _linspace_timestep_sigmas(schedule: DiscreteSchedule, steps: int, sgm: bool) -> torch.Tensor:
    start = schedule.timestep(schedule.sigma_max)
    end = schedule.timestep(schedule.sigma_min)
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
        append_zero = True
    else:
        # A schedule whose smallest sigma is already 0 (zero terminal SNR) ends on it instead of appending one.
        append_zero = not math.isclose(float(schedule.sigma(end)), 0, abs_tol=0.00001)
        timesteps = torch.linspace(start, end, steps if append_zero else steps + 1)
    sigmas = [float(schedule.sigma(t)) for t in timesteps]
    return torch.tensor(sigmas + ([0.0] if append_zero else []), dtype=torch.float32)


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Every (1000/steps)-th training sigma from the top (ComfyUI "simple")."""
    _check_steps(steps)
    stride = len(schedule.sigmas) / steps
    sigmas = [float(schedule.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def ddim_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Training sigmas 1, 1+k, 1+2k, ... with k = 1000 // steps, reversed (ComfyUI "ddim_uniform").

    As in ComfyUI the grid can hold more than `steps + 1` sigmas when 1000 is not a multiple of `steps`.
    """
    _check_steps(steps)
    first = 1
    if math.isclose(float(schedule.sigmas[first]), 0, abs_tol=0.00001):
        steps += 1
        sigmas = []
    else:
        sigmas = [0.0]
    stride = max(len(schedule.sigmas) // steps, 1)
    sigmas += [float(s) for s in schedule.sigmas[first::stride]]
    return torch.tensor(sigmas[::-1], dtype=torch.float32)


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigmas evenly spaced in sigma^(1/rho) (ComfyUI "karras")."""
    _check_steps(steps)
    sigma_min, sigma_max = float(schedule.sigma_min), float(schedule.sigma_max)
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma (k-diffusion `get_sigmas_exponential`; ComfyUI "exponential")."""
    _check_steps(steps)
    sigma_min, sigma_max = float(schedule.sigma_min), float(schedule.sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps).exp())


def beta_sigmas(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(alpha, beta) quantiles, duplicates dropped (Lee et al. 2024, arXiv 2407.12173;
    ComfyUI "beta")."""
    _check_steps(steps)
    last_timestep = len(schedule.sigmas) - 1
    sigmas = []
    previous = None
    for i in range(steps):
        # 1 - i/steps, the values of ComfyUI's `1 - numpy.linspace(0, 1, steps, endpoint=False)`.
        quantile = 1.0 - i * (1.0 / steps)
        # Python's round() rounds half to even like numpy.rint.
        t = round(beta_ppf(quantile, alpha, beta) * last_timestep)
        if t != previous:
            sigmas.append(float(schedule.sigmas[t]))
        previous = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function I_x(a, b): Newton's method kept inside a bisection
    bracket (scipy `beta.ppf` without scipy)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {q}")
    if a <= 0 or b <= 0:
        raise ValueError(f"beta parameters must be positive, got a={a}, b={b}")
    if q == 0.0 or q == 1.0:
        return q
    if a == b and q == 0.5:
        return 0.5  # the median of a symmetric beta; an iterate one ulp below it would flip a later rounding
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        error = regularized_incomplete_beta(x, a, b) - q
        if error == 0.0:
            return x
        if error < 0:
            lo = x
        else:
            hi = x
        density = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        newton = x - error / density
        x_next = newton if lo < newton < hi else 0.5 * (lo + hi)
        if x_next == x or hi - lo <= 2 * math.ulp(x):
            return x_next
        x = x_next
    raise ArithmeticError(f"beta quantile did not converge for q={q}, a={a}, b={b}")


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by Lentz's continued fraction (Numerical Recipes 3rd ed. §6.4), float64."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float, max_terms: int = 500) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, max_terms + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return result
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for x={x}, a={a}, b={b}")


def linear_quadratic_sigmas(schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> torch.Tensor:
    """Noise levels (as fractions of sigma_max) that rise linearly to `threshold_noise` over the first half of the
    steps, then quadratically to 1 with a continuous slope (the Mochi/Genmo schedule; ComfyUI "linear_quadratic").
    The levels are Python floats, reversed into sigmas and scaled by the float32 sigma_max as ComfyUI does."""
    _check_steps(steps)
    if steps == 1:
        levels = [0.0, 1.0]
    else:
        ramp = steps // 2 if linear_steps is None else linear_steps
        rest = steps - ramp
        # The quadratic q(i) = a i^2 + b i + c meets the linear part's value at i = ramp and reaches 1 at steps.
        gap = ramp - threshold_noise * steps
        a = gap / (ramp * rest**2)
        b = threshold_noise / ramp - 2 * gap / (rest**2)
        c = a * (ramp**2)
        levels = [i * threshold_noise / ramp for i in range(ramp)]
        levels += [a * (i**2) + b * i + c for i in range(ramp, steps)]
        levels += [1.0]
    return torch.tensor([1.0 - level for level in levels], dtype=torch.float32) * schedule.sigma_max


def kl_optimal_sigmas(schedule: DiscreteSchedule, steps: int) -> torch.Tensor:
    """Sigmas evenly spaced in arctan(sigma), the schedule that minimises the KL bound of the DDIM discretisation
    for Gaussian data (Sabour et al. 2024, "Align Your Steps", arXiv 2404.14507; AUTOMATIC1111 PR 15608; ComfyUI
    "kl_optimal").

    One step runs from sigma_max straight to 0; ComfyUI divides by steps - 1 there and produces NaN."""
    _check_steps(steps)
    sigma_min, sigma_max = float(schedule.sigma_min), float(schedule.sigma_max)
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float32)
    fraction = torch.arange(steps, dtype=torch.float32).div_(steps - 1)
    angles = fraction * math.atan(sigma_min) + (1 - fraction) * math.atan(sigma_max)
    return _append_zero(angles.tan_())


Scheduler = Callable[[DiscreteSchedule, int], torch.Tensor]

# ComfyUI 0.3.64's scheduler names (`comfy/samplers.py SCHEDULER_HANDLERS`), all of them, in its menu order.
SCHEDULERS: dict[str, Scheduler] = {
    "simple": simple_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": kl_optimal_sigmas,
}


def scheduler_sigmas(schedule: DiscreteSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The grid of a scheduler by name (ComfyUI `samplers.calculate_sigmas`)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[scheduler](schedule, steps)


def ksampler_sigmas(
    schedule: DiscreteSchedule, scheduler: str, sampler: str, steps: int, denoise: float = 1.0
) -> torch.Tensor:
    """The grid ComfyUI's KSampler runs, with its `denoise` (img2img strength) semantics (`KSampler.set_steps`).

    With denoise < 1 the grid of `int(steps / denoise)` steps is built and its last `steps + 1` sigmas kept; with
    denoise <= 0 the grid is empty and nothing runs.
    """
    _check_steps(steps)
    if denoise > 0.9999:
        return _sampler_grid(schedule, scheduler, sampler, steps)
    if denoise <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    return _sampler_grid(schedule, scheduler, sampler, int(steps / denoise))[-(steps + 1):]


def _sampler_grid(schedule: DiscreteSchedule, scheduler: str, sampler: str, steps: int) -> torch.Tensor:
    if sampler not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        return scheduler_sigmas(schedule, scheduler, steps)
    sigmas = scheduler_sigmas(schedule, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


def sigmas_for_range(
    sigmas: torch.Tensor, start_step: int | None = None, end_step: int | None = None, leftover_noise: bool = False
) -> torch.Tensor:
    """The part of a grid that KSamplerAdvanced runs for `start_at_step`/`end_at_step` (ComfyUI `KSampler.sample`).

    `end_step` keeps `sigmas[:end_step + 1]` and, unless `leftover_noise` (return_with_leftover_noise), sets its last
    sigma to 0 so the run ends fully denoised; `start_step` then drops the first `start_step` sigmas. When nothing
    is left to run the result is empty and the caller returns its latent unchanged.
    """
    if sigmas.ndim != 1:
        raise ValueError(f"expected a 1-D sigma grid, got shape {tuple(sigmas.shape)}")
    for name, value in (("start_step", start_step), ("end_step", end_step)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if end_step is not None and end_step < len(sigmas) - 1:
        sigmas = sigmas[: end_step + 1].clone()
        if not leftover_noise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return sigmas[:0]
        sigmas = sigmas[start_step:]
    return sigmas
