"""The command line's defaults: the core's own for real checkpoints, and a small, fast run for the tiny demo."""

from __future__ import annotations

from dataclasses import fields

from ..pipeline import GenerationRequest

_SETTINGS = ("width", "height", "steps", "cfg", "sampler", "scheduler")

# generate: GenerationRequest's defaults (1024², SDXL's 25-step two-stage recipe, ComfyUI KSampler's cfg/sampler).
FULL = {f.name: f.default for f in fields(GenerationRequest) if f.name in _SETTINGS}
# demo: the tiny random-weight models make noise by design; 10 steps at 256² show the whole path in seconds.
DEMO = {**FULL, "width": 256, "height": 256, "steps": 10, "cfg": 5.0}
