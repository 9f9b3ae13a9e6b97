"""Seeded noise: the initial latent noise, its first-step scaling, and the noise samplers of stochastic samplers.

`prepare_noise` and `noise_scaling` reproduce ComfyUI (`comfy/sample.py prepare_noise`, `model_sampling.EPS
.noise_scaling`, `samplers.Sampler.max_denoise`) bit for bit. `GaussianNoiseSampler` is ComfyUI's
`default_noise_sampler` (ancestral samplers). `BrownianNoiseSampler` replaces torchsde's BrownianTree, which this
project does not depend on: it samples the same kind of Brownian path, seeded and deterministic, but not the same
random numbers, so dpmpp_sde / dpmpp_2m_sde are reproducible here but not bit-equal to ComfyUI.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch

from .denoiser import broadcastable_sigma

# noise_sampler(sigma, sigma_next) -> standard normal noise shaped like the latent.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_noise(
    latent_or_shape: torch.Tensor | Sequence[int], seed: int, batch_index: Sequence[int] | None = None
) -> torch.Tensor:
    """Initial noise as ComfyUI's KSampler draws it: a CPU generator seeded with `seed`, the latent's shape and dtype
    (float32 for a bare shape); with `batch_index`, item k gets the `batch_index[k]`-th single-item draw
    (ComfyUI `comfy/sample.py prepare_noise`)."""
    if isinstance(latent_or_shape, torch.Tensor):
        shape, dtype, layout = tuple(latent_or_shape.shape), latent_or_shape.dtype, latent_or_shape.layout
    else:
        shape, dtype, layout = tuple(int(s) for s in latent_or_shape), torch.float32, torch.strided
    if len(shape) < 2:
        raise ValueError(f"expected a latent shape [B, C, ...], got {shape}")
    # A private generator gives the numbers of ComfyUI's torch.manual_seed(seed) without reseeding the global RNG.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if batch_index is None:
        return torch.randn(shape, dtype=dtype, layout=layout, generator=generator, device="cpu")
    indices = _check_batch_index(batch_index, shape[0])
    wanted = set(indices)
    draws = {}
    for i in range(max(indices) + 1):
        item = torch.randn((1,) + shape[1:], dtype=dtype, layout=layout, generator=generator, device="cpu")
        if i in wanted:
            draws[i] = item
    return torch.cat([draws[i] for i in indices], dim=0)


def _check_batch_index(batch_index: Sequence[int], batch: int) -> list[int]:
    indices = [int(i) for i in batch_index]
    if len(indices) != batch or any(i < 0 for i in indices):
        raise ValueError(f"batch_index must hold one non-negative index per latent in the batch ({batch}), "
                         f"got {list(batch_index)}")
    return indices


def is_max_denoise(sigmas: torch.Tensor, sigma_max: torch.Tensor | float) -> bool:
    """Whether a run starts from pure noise: its first sigma is (close to) the schedule's largest
    (ComfyUI `Sampler.max_denoise`)."""
    first, largest = float(sigmas[0]), float(sigma_max)
    return math.isclose(largest, first, rel_tol=1e-05) or first > largest


def noise_scaling(sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool) -> torch.Tensor:
    """The sampler's starting point: noise * sqrt(1 + sigma^2) when starting from pure noise (the variance of a
    VP sample in VE scaling), else latent + noise * sigma (ComfyUI `EPS.noise_scaling`; sgm `prepare_sampling_loop`)."""
    sigma = broadcastable_sigma(torch.as_tensor(sigma, device=noise.device), noise.ndim)
    if max_denoise:
        scaled = noise * torch.sqrt(1.0 + sigma**2.0)
    else:
        scaled = noise * sigma
    return scaled + latent


class GaussianNoiseSampler:
    """Fresh standard normal noise per call from one generator seeded once on x's device (ComfyUI
    `default_noise_sampler`, used by the ancestral samplers)."""

    def __init__(self, x: torch.Tensor, seed: int):
        self._like = x
        self._generator = torch.Generator(device=x.device).manual_seed(seed)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        x = self._like
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=self._generator)


class BrownianNoiseSampler:
    """Normalized increments (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of one seeded Brownian path in
    sigma, filled in lazily with Brownian bridges (Lévy's construction); stands in for ComfyUI's
    `BrownianTreeNoiseSampler` with the same law, including the correlation of overlapping intervals."""

    def __init__(self, x: torch.Tensor, seed: int):
        self._shape, self._dtype, self._device = x.shape, x.dtype, x.device
        # Drawn on the CPU in float32 so a seed gives the same path on every device.
        self._generator = torch.Generator(device="cpu").manual_seed(seed)
        self._times: list[float] = []
        self._values: list[torch.Tensor] = []

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        s, s_next = float(sigma), float(sigma_next)
        if s == s_next:
            raise ValueError(f"a Brownian increment needs two different sigmas, got {s} twice")
        increment = self._value_at(s_next) - self._value_at(s)
        return (increment / math.sqrt(abs(s_next - s))).to(device=self._device, dtype=self._dtype)

    def _value_at(self, t: float) -> torch.Tensor:
        k = bisect.bisect_left(self._times, t)
        if k < len(self._times) and self._times[k] == t:
            return self._values[k]
        if not self._times:
            value = torch.zeros(self._shape)
        elif k == 0:
            value = self._values[0] + math.sqrt(self._times[0] - t) * self._randn()
        elif k == len(self._times):
            value = self._values[-1] + math.sqrt(t - self._times[-1]) * self._randn()
        else:
            t0, t1 = self._times[k - 1], self._times[k]
            w0, w1 = self._values[k - 1], self._values[k]
            mean = w0 + (w1 - w0) * ((t - t0) / (t1 - t0))
            value = mean + math.sqrt((t - t0) * (t1 - t) / (t1 - t0)) * self._randn()
        self._times.insert(k, t)
        self._values.insert(k, value)
        return value

    def _randn(self) -> torch.Tensor:
        return torch.randn(self._shape, generator=self._generator)
