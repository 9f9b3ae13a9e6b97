"""Running a named sampler: the caller-side work every sampler shares (noise for the stochastic ones, the start's
noise scaling, the step loop), so each sampler function holds only its update rule."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..noise import BrownianTreeNoiseSampler, GaussianNoiseSampler, NoiseSampler, is_max_denoise, noise_scaling
from ._loop import Callback, Cancel, StepLoop
from ._registry import NoiseKind, get_sampler


def build_noise(kind: NoiseKind, x: torch.Tensor, sigmas: torch.Tensor, seed: int | Sequence[int]) -> NoiseSampler:
    """The noise ComfyUI's samplers of this kind draw for the KSampler `seed`: a generator on x's device for the
    ancestral samplers; a Brownian tree over [smallest positive sigma, largest sigma] for the SDE samplers, on the
    CPU or (the `_gpu` samplers) on x's device; one tree per batch item for a sequence of seeds."""
    if kind is NoiseKind.GAUSSIAN:
        return GaussianNoiseSampler(x, seed)
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        raise ValueError(f"a Brownian-tree sampler needs a positive sigma in its grid, got {sigmas.tolist()}")
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed,
                                    on_device=kind is NoiseKind.BROWNIAN_DEVICE)


def with_uncond(denoiser):
    """The `(x, sigma) -> (x0, uncond_x0)` denoiser a CFG++ sampler steps with: guidance's own (`CFGDenoiser
    .with_uncond`, which runs the unconditional branch even at cfg 1), or, for a denoiser without guidance, its
    prediction twice: with no guidance the unconditional prediction is the prediction itself, and each CFG++
    sampler then reduces to its plain counterpart."""
    paired = getattr(denoiser, "with_uncond", None)
    if paired is not None:
        return paired

    def unguided(x, sigma):
        x0 = denoiser(x, sigma)
        return x0, x0
    return unguided


def integrate(name: str, denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
              seed: int | Sequence[int] | None = None, noise_sampler: NoiseSampler | None = None,
              callback: Callback | None = None, cancel: Cancel | None = None, schedule=None,
              **options) -> torch.Tensor:
    """Run sampler `name` from `x`, already noised at sigmas[0], down the grid. A stochastic sampler draws its noise
    from `noise_sampler` or, by default, from the noise ComfyUI builds for the KSampler `seed`; deterministic
    samplers take neither. A CFG++ sampler steps with `with_uncond(denoiser)`; a sampler that reads the model's
    noise schedule gets `schedule` (a `DiscreteSchedule`). `options` go to the sampler (e.g. `eta`,
    `s_noise`). A grid of fewer than two sigmas returns x unchanged."""
    spec = get_sampler(name)
    if len(sigmas) < 2:
        return x
    loop = StepLoop(callback, cancel)
    if spec.uncond:
        denoiser = with_uncond(denoiser)
    if spec.schedule:
        if schedule is None:
            raise ValueError(f"{name} reads the model's noise schedule: pass schedule= (the model's "
                             "DiscreteSchedule)")
        options["schedule"] = schedule
    if spec.noise is None:
        return spec.fn(denoiser, x, sigmas, loop, **options)
    if noise_sampler is None:
        if seed is None:
            raise ValueError(f"{name} is stochastic: pass seed= (or a noise_sampler) so the run is reproducible")
        noise_sampler = build_noise(spec.noise, x, sigmas, seed)
    return spec.fn(denoiser, x, sigmas, loop, noise_sampler, **options)


def run_sampler(name: str, denoiser, latent: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, *,
                sigma_max: torch.Tensor | float, seed: int | None = None, callback: Callback | None = None,
                cancel: Cancel | None = None, schedule=None) -> torch.Tensor:
    """One KSampler run (ComfyUI `KSAMPLER.sample`): the initial noise is scaled onto the latent at sigmas[0]
    (`noise.noise_scaling`, pure noise when sigmas[0] is the schedule's sigma_max), then the sampler integrates; an
    empty grid returns the latent unchanged. `seed` is the KSampler seed, which ComfyUI also hands to the
    stochastic samplers' noise; `schedule` is the model's noise schedule, which some samplers read; `latent` is in
    the model's (scaled) latent space."""
    get_sampler(name)
    if noise.shape != latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from latent shape {tuple(latent.shape)}")
    if sigmas.numel() == 0:
        return latent
    max_denoise = is_max_denoise(sigmas, sigma_max)  # one read of the grid per run, before it moves
    noise = noise.to(device=latent.device)
    sigmas = sigmas.to(device=latent.device)
    x = noise_scaling(sigmas[0], noise, latent, max_denoise)
    return integrate(name, denoiser, x, sigmas, seed=seed, callback=callback, cancel=cancel, schedule=schedule)
