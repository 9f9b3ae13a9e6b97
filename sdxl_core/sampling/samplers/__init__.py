"""Samplers under ComfyUI's KSampler names, one module per family of samplers.

Every public module of this package is a family and is imported here, so its `@register(...)` samplers join
`SAMPLERS`: a new sampler is one file. The update rules follow ComfyUI's `comfy/k_diffusion/sampling.py` operation for
operation, so the same grid, denoiser and seed give ComfyUI's numbers (see docs/sampling.md for which are bit-equal).
"""

from __future__ import annotations

import importlib
import pkgutil

from ._loop import SamplingCancelled, StepLoop
from ._registry import COMFYUI_SAMPLER_ORDER, SAMPLERS, NoiseKind, SamplerSpec, get_sampler, register
from ._run import build_noise, integrate, run_sampler

for _family in pkgutil.iter_modules(__path__):
    if not _family.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_family.name}")

STOCHASTIC_SAMPLERS = frozenset(name for name, spec in SAMPLERS.items() if spec.stochastic)

__all__ = ["COMFYUI_SAMPLER_ORDER", "SAMPLERS", "STOCHASTIC_SAMPLERS", "NoiseKind", "SamplerSpec",
           "SamplingCancelled", "StepLoop", "build_noise", "get_sampler", "integrate", "register", "run_sampler"]
