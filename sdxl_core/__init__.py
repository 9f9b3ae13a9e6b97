"""sdxl_core: Stable Diffusion XL (base + refiner) in plain PyTorch, usable without ComfyUI.

The names below are the public API. They are resolved on first use (PEP 562), so `import sdxl_core` and the
ComfyUI pack's registration stay light: torch, transformers and the networks load only when a name is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module (under sdxl_core) that defines it
_EXPORTS = {
    # checkpoints
    "load_checkpoint": "checkpoints.loading",
    "open_checkpoint": "checkpoints.loading",
    "load_vae": "checkpoints.loading",
    "save_checkpoint": "checkpoints.loading",
    "inspect_checkpoint": "checkpoints.loading",
    "CheckpointError": "checkpoints.errors",
    "apply_lora": "checkpoints.lora",
    # models
    "SDXLModel": "models.bundle",
    "UNetModel": "models.unet",
    "AutoencoderKL": "models.vae",
    # facts
    "SDXLConfig": "config",
    "SDXL_BASE": "config",
    "SDXL_REFINER": "config",
    "SDXL_BUCKETS": "buckets",
    "bucket_for_ratio": "buckets",
    # composition
    "GenerationRequest": "pipeline",
    "GenerationResult": "pipeline",
    "ImageToImageRequest": "pipeline",
    "generate": "pipeline",
    "image_to_image": "pipeline",
    "encode_base_conditioning": "pipeline",
    "encode_refiner_conditioning": "pipeline",
    "empty_latent": "pipeline",
    "decode": "pipeline",
    "encode": "pipeline",
    # one stage of sampling
    "sample_latent": "sampling.ksampler",
    "SamplingSettings": "sampling.settings",
    "BaseMicroConditioning": "conditioning",
    "RefinerMicroConditioning": "conditioning",
    "SAMPLERS": "sampling.samplers",
    "SCHEDULERS": "sampling.schedules",
    "SamplingCancelled": "sampling.samplers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdxl_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names resolve lazily above
    from .buckets import SDXL_BUCKETS, bucket_for_ratio
    from .checkpoints.errors import CheckpointError
    from .checkpoints.loading import inspect_checkpoint, load_checkpoint, load_vae, open_checkpoint, save_checkpoint
    from .checkpoints.lora import apply_lora
    from .conditioning import BaseMicroConditioning, RefinerMicroConditioning
    from .config import SDXL_BASE, SDXL_REFINER, SDXLConfig
    from .models.bundle import SDXLModel
    from .models.unet import UNetModel
    from .models.vae import AutoencoderKL
    from .pipeline import (
        GenerationRequest,
        GenerationResult,
        ImageToImageRequest,
        decode,
        empty_latent,
        encode,
        encode_base_conditioning,
        encode_refiner_conditioning,
        generate,
        image_to_image,
    )
    from .sampling.ksampler import sample_latent
    from .sampling.samplers import SAMPLERS, SamplingCancelled
    from .sampling.schedules import SCHEDULERS
    from .sampling.settings import SamplingSettings
