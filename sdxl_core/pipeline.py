"""The SDXL two-stage pipeline (Podell et al. 2023 §2.5): the base denoises the high-noise part of the trajectory,
the refiner the low-noise rest, then the VAE decodes. This module only composes: requests in, images out, each
stage delegated (text encoding to `text/`, one sampling stage to `sampling.ksampler`, decoding to
`runtime.vae_decoding`). The command line, the ComfyUI nodes and the tests all call these functions.

Latents cross every function boundary in ComfyUI's LATENT form (see `sampling.ksampler`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .conditioning import (
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    DEFAULT_POSITIVE_AESTHETIC_SCORE,
    BaseMicroConditioning,
    ConditioningMismatch,
    RefinerMicroConditioning,
    make_base_conditioning,
    make_refiner_conditioning,
)
from .config import PREDICTION_TYPES, VAE_DOWNSCALE, require_stage
from .models.bundle import SDXLModel
from .models.vae import AutoencoderKL
from .runtime.memory_estimate import check_generation_fits
from .runtime.residency import ResidencyPlan
from .runtime.stages import pipeline_stage
from .runtime.vae_decoding import comfy_to_images, decode_latents, encode_images, images_to_comfy
from .sampling.control import ControlNetUse, apply_controlnets
from .sampling.inpaint import NOISE_MASK, noise_mask_for_image
from .sampling.ksampler import sample_latent
from .sampling.model_sampling import rescale_cfg_for, with_prediction
from .sampling.settings import TWO_STAGE_HANDOFF, TWO_STAGE_STEPS, SamplingSettings
from .text.embeddings import EmbeddingLibrary
from .text.prompt_encoding import encode_base_prompt, encode_refiner_prompt

StepCallback = Callable[[dict], None]
Cancel = Callable[[], bool]

__all__ = [
    "ConditioningMismatch", "GenerationRequest", "GenerationResult", "ImageToImageRequest",
    "encode_base_conditioning", "encode_refiner_conditioning", "decode", "encode", "empty_latent", "generate",
    "image_to_image",
]


def check_image_size(width: int, height: int) -> None:
    """Refuse sizes the VAE cannot represent exactly."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0 or value % VAE_DOWNSCALE:
            raise ValueError(f"{name} must be a positive multiple of {VAE_DOWNSCALE} pixels, got {value}")


def empty_latent(width: int, height: int, batch_size: int = 1) -> dict:
    """An all-zero LATENT of the given pixel size (ComfyUI `EmptyLatentImage`)."""
    check_image_size(width, height)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return {"samples": torch.zeros(batch_size, 4, height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)}


def encode_base_conditioning(model: SDXLModel, text_g: str, text_l: str | None = None, *,
                             micro: BaseMicroConditioning | None = None, empty_prompt: str = "encode",
                             embeddings=None) -> list:
    """Base CONDITIONING: [CLIP-L | bigG] penultimate context, bigG pooled, and the size micro-conditioning
    (ComfyUI `CLIPTextEncodeSDXL`; `text_l` defaults to `text_g`). `embeddings`: where `embedding:name` is looked
    up (sdxl_core/text/embeddings.py).

    Without `micro` the conditioning carries no size fields and the sampler uses the latent's size for original and
    target (ComfyUI's rule), which is right for every aspect bucket.
    """
    require_stage(model, "base", "encoding a base prompt")
    context, pooled = encode_base_prompt(model.clip_l, model.clip_g, text_l if text_l is not None else text_g,
                                         text_g, tokenizer=model.tokenizer, empty_prompt=empty_prompt,
                                         embeddings=embeddings)
    return make_base_conditioning(context, pooled, micro)


def encode_refiner_conditioning(model: SDXLModel, text: str, *, micro: RefinerMicroConditioning | None = None,
                                aesthetic_score: float | None = None, empty_prompt: str = "encode",
                                embeddings=None) -> list:
    """Refiner CONDITIONING: bigG penultimate context, bigG pooled, size and aesthetic score (ComfyUI
    `CLIPTextEncodeSDXLRefiner`). Sizes default to the latent's; the aesthetic score to `micro`'s, else 6.0 on the
    positive and 2.5 on the negative side (decided by the sampler, which knows the side)."""
    require_stage(model, "refiner", "encoding a refiner prompt")
    context, pooled = encode_refiner_prompt(model.clip_g, text, tokenizer=model.tokenizer, empty_prompt=empty_prompt,
                                            embeddings=embeddings)
    return make_refiner_conditioning(context, pooled, micro, aesthetic_score=aesthetic_score)


def decode(vae: AutoencoderKL | SDXLModel, latent: dict, *, tiled: bool | None = None) -> torch.Tensor:
    """LATENT → IMAGE ([B, H, W, 3] float32 in 0..1 on the CPU), with the NaN guard and tiled fallback."""
    vae = vae.vae if isinstance(vae, SDXLModel) else vae
    return images_to_comfy(decode_latents(vae, latent["samples"], tiled=tiled))


def encode(vae: AutoencoderKL | SDXLModel, image: torch.Tensor, *, tiled: bool | None = None,
           seed: int | None = None) -> dict:
    """IMAGE → LATENT (unscaled): without `seed` the posterior mean, as ComfyUI's VAEEncode returns it (its
    regularizer defaults to sample=False since Comfy-Org/ComfyUI#8705); with `seed` a posterior sample drawn from a
    generator seeded with it, as sgm and diffusers encode."""
    vae = vae.vae if isinstance(vae, SDXLModel) else vae
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [batch, height, width, 3], got {tuple(image.shape)}")
    height, width = image.shape[1:3]
    if height % VAE_DOWNSCALE or width % VAE_DOWNSCALE:
        raise ValueError(f"image sides must be multiples of {VAE_DOWNSCALE} pixels to encode, got {width}x{height}")
    generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
    latents = encode_images(vae, comfy_to_images(image[..., :3]), tiled=tiled, sample=seed is not None,
                            generator=generator)
    return {"samples": latents.float().cpu()}


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one text-to-image run needs; sizes in pixels, (height, width) pairs as in sgm."""

    prompt: str
    negative: str = ""
    prompt_l: str | None = None
    width: int = 1024
    height: int = 1024
    original_size: tuple[int, int] | None = None  # (h, w); None = output size
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # (h, w); None = output size
    aesthetic_score: float = DEFAULT_POSITIVE_AESTHETIC_SCORE
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE
    steps: int = TWO_STAGE_STEPS
    refiner_start: int = TWO_STAGE_HANDOFF  # the refiner runs steps [refiner_start, steps); ignored without one
    cfg: float = SamplingSettings.cfg
    sampler: str = SamplingSettings.sampler
    scheduler: str = SamplingSettings.scheduler
    seed: int = SamplingSettings.seed
    batch_size: int = 1
    rescale_cfg: float = SamplingSettings.rescale_cfg  # RescaleCFG's multiplier (0: plain CFG)
    # Overrides of the base's prediction type / zero terminal SNR, as ComfyUI's ModelSamplingDiscrete (None: the
    # checkpoint's own, from its markers); the refiner keeps its own.
    prediction: str | None = None
    zsnr: bool | None = None
    sampling: SamplingSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_image_size(self.width, self.height)
        object.__setattr__(self, "sampling", SamplingSettings(seed=self.seed, steps=self.steps, cfg=self.cfg,
                                                              sampler=self.sampler, scheduler=self.scheduler,
                                                              rescale_cfg=self.rescale_cfg))
        _check_prediction_override(self.prediction, self.zsnr)
        if not 0 < self.refiner_start <= self.steps:
            raise ValueError(f"the refiner start step must lie in 1..{self.steps} (the total steps), "
                             f"got {self.refiner_start}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        self.base_micro_conditioning()  # refuses a malformed size or crop now, not after loading

    def base_micro_conditioning(self) -> BaseMicroConditioning:
        """The base's size conditioning: original and target default to the output size."""
        output = (self.height, self.width)
        return BaseMicroConditioning(original_size=self.original_size or output, crop_top_left=self.crop_top_left,
                                     target_size=self.target_size or output)

    def parameters(self) -> dict:
        """The settings as plain values, for the PNG text chunk."""
        return _plain(self)


@dataclass(frozen=True)
class ImageToImageRequest:
    """Everything one image-to-image run needs: KSampler's partial denoise of an encoded image by one stage (the
    refiner polishing a finished image, or the base reworking one)."""

    prompt: str
    negative: str = ""
    prompt_l: str | None = None  # base only: a separate CLIP-L prompt
    strength: float = 0.3  # KSampler's denoise: the share of the noise schedule run again, (0, 1]
    steps: int = SamplingSettings.steps  # steps actually run (ComfyUI stretches the grid to steps / strength)
    aesthetic_score: float = DEFAULT_POSITIVE_AESTHETIC_SCORE  # refiner only
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE  # refiner only
    cfg: float = SamplingSettings.cfg
    sampler: str = SamplingSettings.sampler
    scheduler: str = SamplingSettings.scheduler
    seed: int = SamplingSettings.seed
    rescale_cfg: float = SamplingSettings.rescale_cfg
    prediction: str | None = None  # the model's prediction type / zsnr overridden (None: the checkpoint's own)
    zsnr: bool | None = None
    sampling: SamplingSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.strength, (int, float)) and 0.0 < self.strength <= 1.0):
            raise ValueError(f"strength must lie in (0, 1] (1 repaints the image from pure noise), got "
                             f"{self.strength}")
        object.__setattr__(self, "sampling", SamplingSettings(seed=self.seed, steps=self.steps, cfg=self.cfg,
                                                              sampler=self.sampler, scheduler=self.scheduler,
                                                              denoise=self.strength, rescale_cfg=self.rescale_cfg))
        _check_prediction_override(self.prediction, self.zsnr)

    def parameters(self) -> dict:
        return _plain(self)


def _check_prediction_override(prediction: str | None, zsnr: bool | None) -> None:
    if prediction is not None and prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTION_TYPES)} (or None for the checkpoint's "
                         f"own), got {prediction!r}")
    if zsnr is not None and not isinstance(zsnr, bool):
        raise ValueError(f"zsnr must be True, False or None (the checkpoint's own), got {zsnr!r}")


def with_request_prediction(model: SDXLModel, request: GenerationRequest | ImageToImageRequest) -> SDXLModel:
    """The model sampled with the request's prediction-type / zsnr override, if it has one (weights shared)."""
    if request.prediction is None and request.zsnr is None:
        return model
    return with_prediction(model, request.prediction, request.zsnr)


def model_sampling_parameters(model: SDXLModel, request: GenerationRequest | ImageToImageRequest) -> dict:
    """How a stage was sampled, for the PNG text chunk: its prediction type, zero terminal SNR and the RescaleCFG
    multiplier it ran with (the request's or one patched onto the model)."""
    return {"prediction": model.config.prediction, "zsnr": model.config.noise_schedule.zsnr,
            "rescale_cfg": rescale_cfg_for(model, request.rescale_cfg)}


def _plain(request) -> dict:
    """A request's settings as plain values, for the PNG text chunk."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in request.__dict__.items() if k != "sampling"}


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, H, W, 3] float32 in 0..1
    latent: dict
    parameters: dict = field(default_factory=dict)  # the request's settings and how the (base) model sampled


def generate(base: SDXLModel | str | os.PathLike, refiner: SDXLModel | str | os.PathLike | None,
             request: GenerationRequest, *,
             on_step: Callable[[str], None] | None = None, cancel: Cancel | None = None,
             empty_prompt: str = "encode", residency: ResidencyPlan | None = None,
             embeddings=None, controls: Sequence[ControlNetUse] = ()) -> GenerationResult:
    """Text to image: the base runs steps [0, K) and hands its latent, noise left in, to the refiner for [K, N)
    (ComfyUI's KSamplerAdvanced pair; diffusers `denoising_end`/`denoising_start`); without a refiner the base runs
    all N steps. `residency` moves only each step's weights onto the GPU (sdxl_core/runtime/residency.py: 8 GB
    cards). `embeddings`: where the prompts' `embedding:name` references are looked up (text/embeddings.py).
    `controls`: ControlNets applied to the base's conditioning (SDXL ControlNets steer the base only).

    Memory: each step reads the networks it needs when it starts and releases them when it ends, for models opened
    with `open_checkpoint` (or given as checkpoint paths, which are opened so): the text encoders are gone before
    the UNet is read, the base UNet before the refiner's. Networks already in memory (`load_checkpoint`, LoRA
    merges) stay as they are (sdxl_core/runtime/stages.py)."""
    base, refiner = _opened(base, "base"), _opened(refiner, "refiner")
    if base is not None:
        base = with_request_prediction(base, request)
    embeddings = EmbeddingLibrary.from_source(embeddings)  # one library: each file is read once
    stage = functools.partial(pipeline_stage, residency=residency)
    require_stage(base, "base", "generate's base")
    if refiner is not None:
        require_stage(refiner, "refiner", "generate's refiner")
    check_generation_fits(base, refiner, request, residency=residency)  # before any weight is read
    micro = request.base_micro_conditioning()
    with stage(base, "text"):
        positive, negative = (encode_base_conditioning(base, text_g, text_l, micro=micro, empty_prompt=empty_prompt,
                                                       embeddings=embeddings)
                              for text_g, text_l in ((request.prompt, request.prompt_l), (request.negative, None)))
    positive, negative = apply_controlnets(positive, negative, controls)
    latent = empty_latent(request.width, request.height, request.batch_size)
    base_end = request.refiner_start if refiner is not None and request.refiner_start < request.steps else None

    def step_reporter(stage: str) -> StepCallback | None:
        return None if on_step is None else (lambda _info: on_step(stage))

    with stage(base, "unet"):
        latent = sample_latent(base, latent, positive, negative, request.sampling, end_step=base_end,
                               return_with_leftover_noise=base_end is not None, callback=step_reporter("base"),
                               cancel=cancel)
    if base_end is not None:
        # sgm's `apply_refiner` (and diffusers' refiner defaults) condition the refiner on the output size with
        # crop (0, 0), whatever original size or crop the base was given.
        with stage(refiner, "text"):
            refiner_positive, refiner_negative = _refiner_pair(refiner, request, request.width, request.height,
                                                               empty_prompt, embeddings)
        with stage(refiner, "unet"):
            latent = sample_latent(refiner, latent, refiner_positive, refiner_negative, request.sampling,
                                   start_step=base_end, add_noise=False, callback=step_reporter("refiner"),
                                   cancel=cancel)
    # Both checkpoints carry the same SDXL VAE; diffusers' refiner example shares the base's too.
    with stage(base, "vae"):
        images = decode(base, latent)
    return GenerationResult(images=images, latent=latent,
                            parameters={**request.parameters(), **model_sampling_parameters(base, request)})


def _opened(model: SDXLModel | str | os.PathLike | None, kind: str) -> SDXLModel | None:
    """A model given as a checkpoint path, opened at the default precision for this machine (read stage by stage)."""
    if model is None or isinstance(model, SDXLModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        from .checkpoints.loading import open_checkpoint

        return open_checkpoint(model, expect=kind)
    raise TypeError(f"the {kind} must be an SDXLModel or the path of its checkpoint, got {type(model).__name__}")


def image_to_image(model: SDXLModel, images: torch.Tensor, request: ImageToImageRequest, *,
                   on_step: Callable[[str], None] | None = None, cancel: Cancel | None = None,
                   empty_prompt: str = "encode", residency: ResidencyPlan | None = None,
                   embeddings=None, mask: torch.Tensor | None = None,
                   controls: Sequence[ControlNetUse] = ()) -> GenerationResult:
    """IMAGE → IMAGE with one stage: VAE encode (posterior mean, as ComfyUI's VAEEncode), KSampler with
    `denoise=strength`, VAE decode: the nodes' VAE Encode → sampler (start 0, denoise) → VAE Decode chain. The
    conditioning describes the image's own size with crop (0, 0); the refiner's carries the aesthetic scores.
    `mask` (a MASK of the image's size, 1 repaints) inpaints as VAE Encode → SetLatentNoiseMask → KSampler;
    `controls` are ControlNets applied to the conditioning."""
    embeddings = EmbeddingLibrary.from_source(embeddings)
    stage = functools.partial(pipeline_stage, residency=residency)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a [batch, height, width, 3] tensor in 0..1, got {found}")
    height, width = images.shape[1:3]
    check_image_size(width, height)
    _refuse_settings_for_the_other_stage(model, request)
    noise_mask = None if mask is None else noise_mask_for_image(mask, (height, width))  # refused before encoding
    model = with_request_prediction(model, request)
    with stage(model, "vae"):
        latent = encode(model, images)
    if noise_mask is not None:
        latent[NOISE_MASK] = noise_mask
    with stage(model, "text"):
        if model.kind == "refiner":
            positive, negative = _refiner_pair(model, request, width, height, empty_prompt, embeddings)
        else:
            micro = BaseMicroConditioning(original_size=(height, width))
            positive, negative = (
                encode_base_conditioning(model, text_g, text_l, micro=micro, empty_prompt=empty_prompt,
                                         embeddings=embeddings)
                for text_g, text_l in ((request.prompt, request.prompt_l), (request.negative, None)))
    positive, negative = apply_controlnets(positive, negative, controls)
    with stage(model, "unet"):
        latent = sample_latent(model, latent, positive, negative, request.sampling, cancel=cancel,
                               callback=None if on_step is None else (lambda _info: on_step(model.kind)))
    with stage(model, "vae"):
        out = decode(model, latent)
    return GenerationResult(images=out, latent=latent,
                            parameters={**request.parameters(), **model_sampling_parameters(model, request)})


def _refiner_pair(refiner: SDXLModel, request: GenerationRequest | ImageToImageRequest, width: int, height: int,
                  empty_prompt: str, embeddings) -> tuple[list, list]:
    """The refiner's (positive, negative) CONDITIONING for a request: its prompts and aesthetic scores, the given
    size with crop (0, 0)."""
    micro = RefinerMicroConditioning(original_size=(height, width))
    return tuple(encode_refiner_conditioning(refiner, text, micro=micro, aesthetic_score=score,
                                             empty_prompt=empty_prompt, embeddings=embeddings)
                 for text, score in ((request.prompt, request.aesthetic_score),
                                     (request.negative, request.negative_aesthetic_score)))


def _refuse_settings_for_the_other_stage(model: SDXLModel, request: ImageToImageRequest) -> None:
    """A setting only the other stage reads would be dropped without a word: say so instead."""
    if model.kind == "refiner" and request.prompt_l is not None:
        raise ValueError("a separate CLIP-L prompt was given, but the SDXL refiner has only the OpenCLIP bigG "
                         "encoder: drop prompt_l (--prompt-l), or rework the image with the base")
    if model.kind == "base" and (request.aesthetic_score, request.negative_aesthetic_score) != (
            DEFAULT_POSITIVE_AESTHETIC_SCORE, DEFAULT_NEGATIVE_AESTHETIC_SCORE):
        raise ValueError("aesthetic scores condition only the SDXL refiner, but this model is the base: drop "
                         "them, or rework the image with the refiner")
