"""What a model's output means and the noise levels it was trained on, derived in one place from its config.

This is ComfyUI's `model_sampling` (a schedule plus a prediction type attached to the model), sgm's denoiser
scalings (`EpsScaling` / `VScaling`) and k-diffusion's `DiscreteEpsDDPMDenoiser` beside `DiscreteVDDPMDenoiser`:
samplers see only `denoiser(x, sigma) -> x0`, and this module decides how a network's output becomes x0.
"""

from __future__ import annotations

import dataclasses
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
