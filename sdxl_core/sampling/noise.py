"""Seeded noise: the initial latent noise, its first-step scaling, and the noise samplers of stochastic samplers.

`prepare_noise` and `noise_scaling` reproduce ComfyUI (`comfy/sample.py prepare_noise`, `model_sampling.EPS
.noise_scaling`, `samplers.Sampler.max_denoise`) bit for bit. `GaussianNoiseSampler` is ComfyUI's
`default_noise_sampler` (ancestral samplers). `BrownianTreeNoiseSampler` is ComfyUI's noise sampler of dpmpp_sde /
dpmpp_2m_sde with the same numbers, over this project's own re-derivation of torchsde's BrownianTree (torchsde is
not a dependency).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from .brownian_tree import BrownianTree
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


class BrownianTreeNoiseSampler:
    """Normalized Brownian increments (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| over [sigma_min,
    sigma_max], ComfyUI's numbers: k-diffusion `BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=...)`
    over torchsde 0.2.6's BrownianTree (see `brownian_tree`).

    `on_device=False` is ComfyUI's `cpu=True` (dpmpp_sde, dpmpp_2m_sde, ...): the tree lives on the CPU in x's dtype
    and is queried at float32 times. `on_device=True` is its `cpu=False` (the `_gpu` samplers): the tree lives on
    x's device, so on a GPU its normals come from that device's generator (other numbers than the CPU tree's, as in
    ComfyUI), and it is queried at the sigmas' own precision. On a CPU the two agree whenever the sigmas are float32.

    An int seed drives one tree shaped like the whole batch (what ComfyUI's KSampler passes); a sequence of seeds,
    one per batch item, drives one tree per item. The noise comes back on sigma's device in sigma's dtype, as
    ComfyUI returns it."""

    def __init__(self, x: torch.Tensor, sigma_min: torch.Tensor | float, sigma_max: torch.Tensor | float,
                 seed: int | Sequence[int], *, on_device: bool = False):
        low, high, self._sign = _ordered(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        t0, t1 = float(low.detach().cpu()), float(high.detach().cpu())
        self._on_device = on_device
        device = x.device if on_device else torch.device("cpu")
        # Any whole number (a numpy seed too) is one seed for the batch; a sequence gives one per batch item.
        self._batched = not isinstance(seed, numbers.Integral)
        if not self._batched:
            seed = int(seed)
        if self._batched:
            seeds = list(seed)
            if len(seeds) != x.shape[0]:
                raise ValueError(f"one seed per batch item expected ({x.shape[0]}), got {len(seeds)} seeds")
            self._trees = [BrownianTree(t0, t1, x.shape[1:], entropy=s, dtype=x.dtype, device=device)
                           for s in seeds]
        else:
            self._trees = [BrownianTree(t0, t1, x.shape, entropy=seed, dtype=x.dtype, device=device)]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        if bool(sigma == sigma_next):
            raise ValueError(f"a Brownian increment needs two different sigmas, got {float(sigma)} twice")
        low, high, sign = _ordered(sigma, sigma_next)
        if self._on_device:
            ta, tb = float(low.detach()), float(high.detach())
        else:
            # ComfyUI queries its CPU tree at float32 times.
            ta, tb = float(low.detach().cpu().float()), float(high.detach().cpu().float())
        increments = [tree.increment(ta, tb) for tree in self._trees]
        w = torch.stack(increments) if self._batched else increments[0]
        w = w.to(device=low.device, dtype=low.dtype)
        if self._sign * sign < 0:
            w = -w
        return w / (sigma_next - sigma).abs().sqrt()


def _ordered(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(smaller, larger, +1 if already in order else -1), ties counting as swapped as in k-diffusion."""
    return (a, b, 1) if a < b else (b, a, -1)
