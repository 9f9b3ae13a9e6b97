"""The sampler registry: ComfyUI's KSampler name -> the function that integrates, and what it needs from the caller.

A sampler is a plain function `fn(denoiser, x, sigmas, loop, [noise], **options) -> x` (k-diffusion's shape, with
the caller's concerns lifted out): `denoiser(x, sigma) -> x0`, `x` already noised at `sigmas[0]`, `sigmas` a
descending grid, `loop` the step iterator that polls cancellation and reports progress (`_loop.StepLoop`). Only a
sampler registered with a `noise` kind takes `noise`, a `noise(sigma, sigma_next)` callable the caller builds
(`_run.build_noise`), so deterministic samplers never see a seed.

Two more needs are declared at registration rather than found out by the caller:
- `uncond=True` (the CFG++ samplers, Chung et al. 2024): the sampler steps with the unconditional prediction too,
  so its `denoiser(x, sigma)` returns `(x0, uncond_x0)`; `_run.integrate` builds that from guidance
  (`guidance.CFGDenoiser.with_uncond`), which then runs the unconditional branch even at cfg 1, as ComfyUI's
  `sampler_post_cfg_function` with `disable_cfg1_optimization` does.
- `schedule=True`: the sampler reads the model's noise schedule (`schedule=`, e.g. sa_solver's stochastic interval
  from `percent_to_sigma`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

Sampler = Callable[..., torch.Tensor]


class NoiseKind(Enum):
    """The noise a stochastic sampler draws between steps, as ComfyUI's samplers build it from the KSampler seed."""

    GAUSSIAN = "gaussian"  # k-diffusion `default_noise_sampler`: a generator on x's device (ancestral samplers)
    BROWNIAN = "brownian"  # k-diffusion `BrownianTreeNoiseSampler(..., cpu=True)` over the grid (SDE samplers)
    # `BrownianTreeNoiseSampler(..., cpu=False)` (the `_gpu` samplers): the tree on x's device, so on a GPU it draws
    # that device generator's numbers; on a CPU it equals BROWNIAN for float32 sigmas.
    BROWNIAN_DEVICE = "brownian_device"


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Sampler
    noise: NoiseKind | None = None
    uncond: bool = False  # steps with the unconditional prediction: its denoiser returns (x0, uncond_x0)
    schedule: bool = False  # reads the model's noise schedule, passed as `schedule=`

    @property
    def stochastic(self) -> bool:
        return self.noise is not None


# ComfyUI 0.3.64's `comfy/samplers.py KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"]`: the order its sampler
# widget lists them in, which ours follow.
COMFYUI_SAMPLER_ORDER = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)

_REGISTERED: dict[str, SamplerSpec] = {}
SAMPLERS: dict[str, SamplerSpec] = {}  # in ComfyUI's order; rebuilt on every registration


def register(name: str, *, noise: NoiseKind | None = None, uncond: bool = False,
             schedule: bool = False) -> Callable[[Sampler], Sampler]:
    """Decorator: make `fn` the sampler called `name` (a ComfyUI sampler name); see SamplerSpec for the flags."""
    def decorate(fn: Sampler) -> Sampler:
        if name in _REGISTERED:
            raise ValueError(f"sampler {name!r} is registered twice ({_REGISTERED[name].fn.__module__} and "
                             f"{fn.__module__})")
        _REGISTERED[name] = SamplerSpec(name, fn, noise, uncond, schedule)
        rank = {known: i for i, known in enumerate(COMFYUI_SAMPLER_ORDER)}
        ordered = sorted(_REGISTERED, key=lambda n: (rank.get(n, len(rank)), n))
        SAMPLERS.clear()
        SAMPLERS.update((n, _REGISTERED[n]) for n in ordered)
        return fn
    return decorate


def get_sampler(name: str) -> SamplerSpec:
    """A sampler by its ComfyUI name, or a sentence listing the names there are."""
    spec = SAMPLERS.get(name)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLERS)}")
    return spec
