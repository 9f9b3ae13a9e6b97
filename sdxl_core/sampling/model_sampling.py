"""What a model's output means and the noise levels it was trained on, derived in one place from its config.

This is ComfyUI's `model_sampling` (a schedule plus a prediction type attached to the model), sgm's denoiser
scalings (`EpsScaling` / `VScaling`) and k-diffusion's `DiscreteEpsDDPMDenoiser` beside `DiscreteVDDPMDenoiser`:
samplers see only `denoiser(x, sigma) -> x0`, and this module decides how a network's output becomes x0.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from functools import cache

import torch

from ..config import PREDICTION_TYPES, NoiseScheduleConfig, SDXLConfig
from .denoiser import EpsDenoiser, NetworkFn, VDenoiser
from .schedules import DiscreteSchedule


@dataclass(frozen=True)
class ModelSampling:
    prediction: str
    schedule: DiscreteSchedule

    def denoiser(self, network: NetworkFn, dtype: torch.dtype | None = None) -> EpsDenoiser:
        """`network(x_in, t, **cond) -> output` as a k-diffusion denoiser for this prediction type; `dtype` is the
        network's compute dtype (inputs are cast to it, x0 comes back in float32)."""
        if self.prediction == "eps":
            return EpsDenoiser(network, self.schedule, dtype=dtype)
        if self.prediction == "v_prediction":
            return VDenoiser(network, self.schedule, dtype=dtype)
        raise ValueError(f"no denoiser for prediction type {self.prediction!r}")  # config.PREDICTION_TYPES guards


def model_sampling_for(config: SDXLConfig) -> ModelSampling:
    """The model sampling of a stage's config; stages with the same schedule share its tensors."""
    return _model_sampling(config.prediction, config.noise_schedule)


@cache
def _model_sampling(prediction: str, noise_schedule: NoiseScheduleConfig) -> ModelSampling:
    return ModelSampling(prediction, DiscreteSchedule(noise_schedule))


def with_prediction(model, prediction: str | None = None, zsnr: bool | None = None):
    """The same networks sampled as another prediction type and/or (no) zero terminal SNR: what ComfyUI's
    ModelSamplingDiscrete node overrides, for files that lack the markers (`None` keeps the file's value). A new
    model object; the weights are shared, not copied."""
    config = model.config
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTION_TYPES)}, got {prediction!r}")
    config = dataclasses.replace(
        config, prediction=config.prediction if prediction is None else prediction,
        noise_schedule=config.noise_schedule if zsnr is None else
        dataclasses.replace(config.noise_schedule, zsnr=bool(zsnr)))
    return model.with_config(config)


def with_rescale_cfg(model, multiplier: float):
    """The same networks with RescaleCFG (Lin et al. 2024) patched on, as ComfyUI's RescaleCFG node patches a MODEL:
    every sampler that runs this model blends `multiplier` of the rescaled guided prediction into plain CFG (0
    removes the patch; a second patch replaces the first, as in ComfyUI). A new model object; weights shared."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real) or not math.isfinite(multiplier) \
            or not 0.0 <= multiplier <= 1.0:
        raise ValueError(f"the RescaleCFG multiplier must be a number in [0, 1] (0.7 is usual for v-prediction "
                         f"models), got {multiplier!r}")
    return model.with_config(model.config, rescale_cfg=float(multiplier))


def rescale_cfg_for(model, settings_multiplier: float) -> float:
    """The one RescaleCFG multiplier a run uses: the sampler settings' (the command line's --rescale-cfg) or the
    model's patch (the RescaleCFG node). Two different non-zero values would leave one silently unused: refused."""
    patched = getattr(model, "rescale_cfg", 0.0)
    if patched and settings_multiplier and patched != settings_multiplier:
        raise ValueError(f"RescaleCFG is set twice: {settings_multiplier} in the sampler settings and {patched} "
                         "patched onto the model; keep one of them")
    return settings_multiplier or patched
