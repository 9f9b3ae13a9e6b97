"""One KSampler's settings as one value, validated once where it is made.

The requests (`pipeline.GenerationRequest`, `ImageToImageRequest`), the KSampler emulation (`ksampler.sample_latent`)
and the sampler nodes all carry a `SamplingSettings`, so a bad seed, a NaN cfg or an unknown sampler name is
refused with the same sentence wherever it enters, before any weight is read.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .samplers import SAMPLERS
from .schedules import SCHEDULERS

# ComfyUI's seed widget range: the seed seeds a torch generator, which takes any unsigned 64-bit value.
MAX_SEED = 2**64 - 1
MAX_STEPS = 10000  # ComfyUI KSampler's steps widget maximum

# SDXL's two-stage recipe (the paper's and ComfyUI's SDXL example workflow): 25 steps, the refiner from step 20.
# They differ on purpose from ComfyUI KSampler's 20 steps, which remain the default of a single stage.
TWO_STAGE_STEPS = 25
TWO_STAGE_HANDOFF = 20


@dataclass(frozen=True)
class SamplingSettings:
    """seed, steps, cfg, sampler, scheduler and denoise of one sampling stage, with ComfyUI KSampler's defaults."""

    seed: int = 0
    steps: int = 20
    cfg: float = 8.0
    sampler: str = "euler"
    scheduler: str = "normal"
    denoise: float = 1.0  # KSampler's img2img strength: the share of the schedule run, [0, 1]
    rescale_cfg: float = 0.0  # ComfyUI RescaleCFG's multiplier, [0, 1]; 0 is plain CFG (0.7 for v-pred models)

    def __post_init__(self) -> None:
        if not _whole_number(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number in 0..{MAX_SEED} (2^64 - 1), got {self.seed!r}")
        if not _whole_number(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be a whole number in 1..{MAX_STEPS}, got {self.steps!r}")
        if not _finite_number(self.cfg) or self.cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0 (1 disables guidance; SDXL works best around 5-8), "
                             f"got {self.cfg!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of: {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of: {', '.join(SCHEDULERS)}")
        if not _finite_number(self.denoise) or not 0.0 <= self.denoise <= 1.0:
            raise ValueError(f"denoise must be a number in [0, 1] (1 for text-to-image), got {self.denoise!r}")
        if not _finite_number(self.rescale_cfg) or not 0.0 <= self.rescale_cfg <= 1.0:
            raise ValueError(f"rescale_cfg must be a number in [0, 1] (0 is plain CFG; v-prediction models usually "
                             f"take 0.7), got {self.rescale_cfg!r}")


def _whole_number(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
