"""Calling one sampling stage with the KSampler's settings and step range as keywords, as the tests spell them."""

from __future__ import annotations

from dataclasses import fields

from sdxl_core.sampling.ksampler import sample_latent
from sdxl_core.sampling.settings import SamplingSettings

_SETTINGS = {f.name for f in fields(SamplingSettings)}


def sample_with(model, latent: dict, positive: list, negative: list, **options) -> dict:
    """`sample_latent` with `seed=`, `steps=`, `cfg=`, ... gathered into a SamplingSettings."""
    settings = SamplingSettings(**{k: v for k, v in options.items() if k in _SETTINGS})
    return sample_latent(model, latent, positive, negative, settings,
                         **{k: v for k, v in options.items() if k not in _SETTINGS})
