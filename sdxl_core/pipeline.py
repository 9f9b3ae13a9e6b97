"""The SDXL two-stage pipeline (Podell et al. 2023 §2.5): base denoises the high-noise part of the trajectory,
the refiner the low-noise rest, then the VAE decodes. The command line, the ComfyUI nodes and the tests all call
these functions.

Latents cross every function boundary in ComfyUI's LATENT form, `{"samples": [B, 4, H/8, W/8]}` holding UNSCALED
VAE latents on the CPU; the sampler scales them by the SDXL latent factor on the way in and out
(ComfyUI `latent_formats.SDXL.process_in/out`). Sampling follows ComfyUI's KSamplerAdvanced step by step so that a
workflow's numbers mean the same here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import functools
import os
from functools import lru_cache

import torch

from .conditioning import (
    DEFAULT_NEGATIVE_AESTHETIC_SCORE,
    DEFAULT_POSITIVE_AESTHETIC_SCORE,
    BaseMicroConditioning,
    ConditioningMismatch,
    RefinerMicroConditioning,
    adm_vector,
    check_conditioning_for,
    make_base_conditioning,
    make_refiner_conditioning,
    micro_conditioning_scalars,
)
from .config import VAE_DOWNSCALE
from .sampling.denoiser import EpsDenoiser
from .sampling.guidance import CFGDenoiser, WeightedConditioning
from .models.bundle import SDXLModel
from .models.operations import compute_dtype_of
from .sampling.noise import prepare_noise
from .text.embeddings import EmbeddingLibrary
from .text.prompt_encoding import encode_base_prompt, encode_refiner_prompt
from .runtime.residency import ResidencyPlan
from .runtime.memory_estimate import check_generation_fits
from .runtime.stages import pipeline_stage
from .sampling.samplers import get_sampler, run_sampler
from .sampling.schedules import DiscreteEpsSchedule, ksampler_sigmas, sigmas_for_range
from .models.vae import AutoencoderKL
from .runtime.vae_decoding import comfy_to_images, decode_latents, encode_images, images_to_comfy

StepCallback = Callable[[dict], None]
Cancel = Callable[[], bool]

__all__ = [
    "ConditioningMismatch", "GenerationRequest", "GenerationResult", "DEFAULTS", "encode_base_conditioning",
    "encode_refiner_conditioning", "sample_latent", "decode", "encode", "empty_latent", "generate",
    "validate_conditioning_for",
]


@lru_cache(maxsize=1)
def eps_schedule() -> DiscreteEpsSchedule:
    """SDXL's 1000-step scaled-linear schedule (β 0.00085 → 0.012), shared by base and refiner."""
    return DiscreteEpsSchedule()


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
                             width: int | None = None, height: int | None = None, crop_top: int = 0,
                             crop_left: int = 0, target_width: int | None = None, target_height: int | None = None,
                             empty_prompt: str = "encode", embeddings=None) -> list:
    """Base CONDITIONING: [CLIP-L | bigG] penultimate context, bigG pooled, and the size micro-conditioning
    (ComfyUI `CLIPTextEncodeSDXL`; `text_l` defaults to `text_g`). `embeddings`: where `embedding:name` is looked
    up (sdxl_core/embeddings.py).

    `width`/`height` are the original size; without them the conditioning carries no size fields and the sampler
    uses the latent's size for original and target (ComfyUI's rule), which is right for every aspect bucket.
    """
    _require_stage(model, "base", "encode a base prompt")
    context, pooled = encode_base_prompt(model.clip_l, model.clip_g, text_l if text_l is not None else text_g,
                                         text_g, tokenizer=model.tokenizer, empty_prompt=empty_prompt,
                                         embeddings=embeddings)
    if _no_size(width, height, crop_top, crop_left, target_width, target_height):
        return make_base_conditioning(context, pooled)
    micro = BaseMicroConditioning(original_size=(height, width), crop_top_left=(crop_top, crop_left),
                                  target_size=(target_height or height, target_width or width))
    return make_base_conditioning(context, pooled, micro)


def encode_refiner_conditioning(model: SDXLModel, text: str, *, width: int | None = None,
                                height: int | None = None, crop_top: int = 0, crop_left: int = 0,
                                aesthetic_score: float | None = None, empty_prompt: str = "encode",
                                embeddings=None) -> list:
    """Refiner CONDITIONING: bigG penultimate context, bigG pooled, size and aesthetic score (ComfyUI
    `CLIPTextEncodeSDXLRefiner`). Sizes default to the latent's; the aesthetic score to 6.0 on the positive and
    2.5 on the negative side (decided by the sampler, which knows the side)."""
    _require_stage(model, "refiner", "encode a refiner prompt")
    context, pooled = encode_refiner_prompt(model.clip_g, text, tokenizer=model.tokenizer, empty_prompt=empty_prompt,
                                            embeddings=embeddings)
    if _no_size(width, height, crop_top, crop_left):
        return make_refiner_conditioning(context, pooled, aesthetic_score=aesthetic_score)
    micro = RefinerMicroConditioning(original_size=(height, width), crop_top_left=(crop_top, crop_left),
                                     aesthetic_score=aesthetic_score)
    return make_refiner_conditioning(context, pooled, micro)


def _no_size(width: int | None, height: int | None, crop_top: int, crop_left: int,
             target_width: int | None = None, target_height: int | None = None) -> bool:
    """True when no size field was given; refuse half-given sizes rather than guess the other half."""
    if width is None and height is None:
        if crop_top or crop_left or target_width is not None or target_height is not None:
            raise ValueError("give width and height (the original size) together with a crop or target size")
        return True
    if width is None or height is None:
        raise ValueError(f"give both width and height for the size conditioning, got width={width}, "
                         f"height={height}")
    return False


def validate_conditioning_for(model: SDXLModel, conditioning: list, role: str = "positive") -> None:
    """Raise ConditioningMismatch, in a sentence, unless a CONDITIONING was made for this model's stage."""
    check_conditioning_for(model.config, conditioning, role)


def _require_stage(model: SDXLModel, kind: str, action: str) -> None:
    if model.kind != kind:
        raise ConditioningMismatch(f"cannot {action} with the {model.kind} model: it needs the SDXL {kind}")


def _branch(model: SDXLModel, conditioning: list, role: str, latent_hw: tuple[int, int],
            device: torch.device) -> list[WeightedConditioning]:
    """The UNet inputs (context, y) of each entry of one side of guidance, with its strength and sigma range
    (ComfyUI `samplers.calculate_start_end_timesteps`: percentages of the model's schedule, not of the steps)."""
    check_conditioning_for(model.config, conditioning, role)
    entries = []
    for index, (context, options) in enumerate(conditioning):
        which = f"the {role} conditioning" if len(conditioning) == 1 else f"entry {index} of the {role} conditioning"
        for what, tensor in (("text embeddings", context), ("pooled embedding", options["pooled_output"])):
            if not torch.isfinite(tensor).all():
                # Caught here, or it would surface only after the last step as non-finite latents.
                raise ConditioningMismatch(f"{which}'s {what} contain NaN or infinite values; re-encode the prompt "
                                           "(check its weights, or run the text encoders in fp32)")
        scalars = micro_conditioning_scalars(model.config, options, latent_hw, negative=role == "negative")
        y = adm_vector(options["pooled_output"].float(), scalars)
        gating = {}
        if "start_percent" in options:
            gating["sigma_start"] = eps_schedule().percent_to_sigma(options["start_percent"])
        if "end_percent" in options:
            gating["sigma_end"] = eps_schedule().percent_to_sigma(options["end_percent"])
        entries.append(WeightedConditioning({"context": context.to(device), "y": y.to(device)},
                                            strength=float(options.get("strength", 1.0)), **gating))
    return entries


def _unet_device_dtype(model: SDXLModel) -> tuple[torch.device, torch.dtype]:
    """Where the UNet runs and what it computes in (not necessarily its weights' storage dtype)."""
    return next(model.unet.parameters()).device, compute_dtype_of(model.unet)


def sample_latent(model: SDXLModel, latent: dict, positive: list, negative: list, *, seed: int, steps: int,
                  cfg: float, sampler: str, scheduler: str, start_step: int = 0, end_step: int | None = None,
                  add_noise: bool = True, return_with_leftover_noise: bool = False, denoise: float = 1.0,
                  sigmas: torch.Tensor | None = None, callback: StepCallback | None = None,
                  cancel: Cancel | None = None) -> dict:
    """Run one stage over steps [start_step, end_step) of an N-step grid, with ComfyUI KSamplerAdvanced semantics
    (`add_noise`, `return_with_leftover_noise`) and KSampler's `denoise` strength for img2img.

    `sigmas` replaces the scheduler's grid (ComfyUI SamplerCustom's SIGMAS input); the step range still applies.
    """
    samples = _check_latent(latent, model)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive whole number, got {steps!r}")
    if end_step is not None and start_step >= end_step:
        raise ValueError(f"start step {start_step} must come before end step {end_step} (of {steps} steps)")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must lie in [0, 1], got {denoise}")
    schedule = eps_schedule()
    if sigmas is None:
        sigmas = ksampler_sigmas(schedule, scheduler, sampler, steps, denoise)
    elif denoise != 1.0:
        raise ValueError(f"denoise={denoise} shapes the scheduler's grid, but an explicit sigmas grid was given; "
                         "cut the grid itself (e.g. its last steps + 1 sigmas) for a partial denoise")
    sigmas = sigmas_for_range(sigmas, start_step, end_step, leftover_noise=return_with_leftover_noise)
    if len(sigmas) < 2:
        return {**latent, "samples": samples.clone()}

    device, _ = _unet_device_dtype(model)
    noise = prepare_noise(samples, seed, latent.get("batch_index")) if add_noise else torch.zeros_like(samples)
    scale = model.config.vae.scale_factor
    denoiser = _guided_denoiser(model, positive, negative, cfg, tuple(samples.shape[-2:]))
    with torch.inference_mode():
        x = run_sampler(sampler, denoiser, samples.to(device) * scale, noise.to(device), sigmas,
                        sigma_max=schedule.sigma_max, seed=seed, callback=callback, cancel=cancel)
    out = (x / scale).float().cpu()
    if not torch.isfinite(out).all():
        _, dtype = _unet_device_dtype(model)
        hint = ("run the UNet in bf16 or fp32" if dtype == torch.float16 else
                f"the UNet already computes in {str(dtype).removeprefix('torch.')}: its weights or the input latent "
                "are out of range")
        raise FloatingPointError(f"the {model.kind} sampler produced non-finite latents; {hint}")
    return {**latent, "samples": out}


def denoise_from(model: SDXLModel, x: torch.Tensor, sigmas: torch.Tensor, positive: list, negative: list, *,
                 cfg: float, sampler: str, seed: int | None = None, callback: StepCallback | None = None,
                 cancel: Cancel | None = None) -> torch.Tensor:
    """Integrate from an already noised latent `x` (model scale, at sigmas[0]) down the grid `sigmas` with guided
    UNet calls; for callers that prepare their own start (e.g. diffusers parity, whose start is noise·√(σ0²+1))."""
    device, _ = _unet_device_dtype(model)
    denoiser = _guided_denoiser(model, positive, negative, cfg, tuple(x.shape[-2:]))
    with torch.inference_mode():
        return get_sampler(sampler)(denoiser, x.to(device), sigmas.to(device), callback=callback, cancel=cancel,
                                    seed=seed)


def _guided_denoiser(model: SDXLModel, positive: list, negative: list, cfg: float,
                     latent_hw: tuple[int, int]) -> CFGDenoiser:
    """x -> guided x0 for this stage: UNet as an eps denoiser, both conditionings (each side the strength-weighted
    mean of its entries), one batched call per step where the entries' token lengths allow."""
    device, dtype = _unet_device_dtype(model)
    cond = _branch(model, positive, "positive", latent_hw, device)
    uncond = _branch(model, negative, "negative", latent_hw, device)
    return CFGDenoiser(EpsDenoiser(_UNetEps(model.unet), eps_schedule(), dtype=dtype), cond, uncond, cfg)


class _UNetEps:
    """The UNet as the `model(x_in, t, context=, y=) -> eps` callable EpsDenoiser wraps."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, y: torch.Tensor):
        return self.unet(x_in, t, context, y)


def _check_latent(latent: dict, model: SDXLModel) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("expected a LATENT dict with a 'samples' tensor")
    if "noise_mask" in latent:
        raise ValueError("this latent carries an inpainting noise_mask, which the SDXL two-stage sampler does not "
                         "apply; use ComfyUI's KSampler for inpainting")
    samples = latent["samples"]
    channels = model.config.unet.in_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"expected SDXL latents of shape [batch, {channels}, height/8, width/8], "
                         f"got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("the input latent contains NaN or infinite values")
    return samples


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
    steps: int = 25
    refiner_start: int = 20  # the refiner runs steps [refiner_start, steps); ignored without a refiner
    cfg: float = 8.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_image_size(self.width, self.height)
        _check_sampling(self.steps, self.sampler, self.scheduler)
        if not 0 < self.refiner_start <= self.steps:
            raise ValueError(f"the refiner start step must lie in 1..{self.steps} (the total steps), "
                             f"got {self.refiner_start}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

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
    steps: int = 20  # steps actually run (ComfyUI stretches the grid to steps / strength and runs its tail)
    aesthetic_score: float = DEFAULT_POSITIVE_AESTHETIC_SCORE  # refiner only
    negative_aesthetic_score: float = DEFAULT_NEGATIVE_AESTHETIC_SCORE  # refiner only
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_sampling(self.steps, self.sampler, self.scheduler)
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1] (1 repaints the image from pure noise), got "
                             f"{self.strength}")

    def parameters(self) -> dict:
        return _plain(self)


def _check_sampling(steps: int, sampler: str, scheduler: str) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    get_sampler(sampler)
    from .sampling.schedules import SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {sorted(SCHEDULERS)}")


def _plain(request) -> dict:
    """A request's settings as plain values, for the PNG text chunk."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in request.__dict__.items()}


@dataclass
class GenerationResult:
    images: torch.Tensor  # [B, H, W, 3] float32 in 0..1
    latent: dict
    parameters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Defaults:
    """Defaults of the command line: ComfyUI's SDXL example workflow for full-size models, and a small, fast run
    for the tiny demo models."""

    full: dict = field(default_factory=lambda: {"width": 1024, "height": 1024, "steps": 25, "cfg": 8.0,
                                                "sampler": "euler", "scheduler": "normal"})
    demo: dict = field(default_factory=lambda: {"width": 256, "height": 256, "steps": 10, "cfg": 5.0,
                                                "sampler": "euler", "scheduler": "normal"})


DEFAULTS = _Defaults()


def generate(base: SDXLModel | str | os.PathLike, refiner: SDXLModel | str | os.PathLike | None,
             request: GenerationRequest, *,
             on_step: Callable[[str], None] | None = None, cancel: Cancel | None = None,
             empty_prompt: str = "encode", residency: ResidencyPlan | None = None,
             embeddings=None) -> GenerationResult:
    """Text to image: the base runs steps [0, K) and hands its latent, noise left in, to the refiner for [K, N)
    (ComfyUI's KSamplerAdvanced pair; diffusers `denoising_end`/`denoising_start`); without a refiner the base runs
    all N steps. `residency` moves only each step's weights onto the GPU (sdxl_core/residency.py: 8 GB cards).
    `embeddings`: where the prompts' `embedding:name` references are looked up (sdxl_core/embeddings.py).

    Memory: each step reads the networks it needs when it starts and releases them when it ends, for models opened
    with `open_checkpoint` (or given as checkpoint paths, which are opened so): the text encoders are gone before
    the UNet is read, the base UNet before the refiner's. Networks already in memory (`load_checkpoint`, LoRA
    merges) stay as they are (sdxl_core/runtime/stages.py)."""
    base, refiner = _opened(base, "base"), _opened(refiner, "refiner")
    embeddings = EmbeddingLibrary.from_source(embeddings)  # one library: each file is read once
    stage = functools.partial(pipeline_stage, residency=residency)
    _require_stage(base, "base", "generate")
    if refiner is not None:
        _require_stage(refiner, "refiner", "refine")
    check_generation_fits(base, refiner, request, residency=residency)  # before any weight is read
    height, width = request.height, request.width
    original = request.original_size or (height, width)
    target = request.target_size or (height, width)
    crop_top, crop_left = request.crop_top_left
    with stage(base, "text"):
        positive = encode_base_conditioning(base, request.prompt, request.prompt_l, width=original[1],
                                            height=original[0], crop_top=crop_top, crop_left=crop_left,
                                            target_width=target[1], target_height=target[0],
                                            empty_prompt=empty_prompt, embeddings=embeddings)
        negative = encode_base_conditioning(base, request.negative, None, width=original[1], height=original[0],
                                            crop_top=crop_top, crop_left=crop_left, target_width=target[1],
                                            target_height=target[0], empty_prompt=empty_prompt,
                                            embeddings=embeddings)
    latent = empty_latent(width, height, request.batch_size)
    base_end = request.refiner_start if refiner is not None and request.refiner_start < request.steps else None

    def step_reporter(stage: str) -> StepCallback | None:
        return None if on_step is None else (lambda _info: on_step(stage))

    settings = dict(seed=request.seed, steps=request.steps, cfg=request.cfg, sampler=request.sampler,
                    scheduler=request.scheduler, cancel=cancel)
    with stage(base, "unet"):
        latent = sample_latent(base, latent, positive, negative, end_step=base_end,
                               return_with_leftover_noise=base_end is not None, callback=step_reporter("base"),
                               **settings)
    if base_end is not None:
        # sgm's `apply_refiner` (and diffusers' refiner defaults) condition the refiner on the output size with
        # crop (0, 0), whatever original size or crop the base was given.
        with stage(refiner, "text"):
            refiner_positive, refiner_negative = _refiner_pair(refiner, request, width, height, empty_prompt,
                                                               embeddings)
        with stage(refiner, "unet"):
            latent = sample_latent(refiner, latent, refiner_positive, refiner_negative, start_step=base_end,
                                   add_noise=False, callback=step_reporter("refiner"), **settings)
    # Both checkpoints carry the same SDXL VAE; diffusers' refiner example shares the base's too.
    with stage(base, "vae"):
        images = decode(base, latent)
    return GenerationResult(images=images, latent=latent, parameters=request.parameters())


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
                   embeddings=None) -> GenerationResult:
    """IMAGE → IMAGE with one stage: VAE encode (posterior mean, as ComfyUI's VAEEncode), KSampler with
    `denoise=strength`, VAE decode: the nodes' VAE Encode → sampler (start 0, denoise) → VAE Decode chain. The
    conditioning describes the image's own size with crop (0, 0); the refiner's carries the aesthetic scores."""
    embeddings = EmbeddingLibrary.from_source(embeddings)
    stage = functools.partial(pipeline_stage, residency=residency)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images as a [batch, height, width, 3] tensor in 0..1, got {found}")
    height, width = images.shape[1:3]
    check_image_size(width, height)
    _refuse_settings_for_the_other_stage(model, request)
    with stage(model, "vae"):
        latent = encode(model, images)
    with stage(model, "text"):
        if model.kind == "refiner":
            positive, negative = _refiner_pair(model, request, width, height, empty_prompt, embeddings)
        else:
            positive, negative = (
                encode_base_conditioning(model, text_g, text_l, width=width, height=height,
                                         empty_prompt=empty_prompt, embeddings=embeddings)
                for text_g, text_l in ((request.prompt, request.prompt_l), (request.negative, None)))
    with stage(model, "unet"):
        latent = sample_latent(model, latent, positive, negative, seed=request.seed, steps=request.steps,
                               cfg=request.cfg, sampler=request.sampler, scheduler=request.scheduler,
                               denoise=request.strength, cancel=cancel,
                               callback=None if on_step is None else (lambda _info: on_step(model.kind)))
    with stage(model, "vae"):
        out = decode(model, latent)
    return GenerationResult(images=out, latent=latent, parameters=request.parameters())


def _refiner_pair(refiner: SDXLModel, request: GenerationRequest | ImageToImageRequest, width: int, height: int,
                  empty_prompt: str, embeddings) -> tuple[list, list]:
    """The refiner's (positive, negative) CONDITIONING for a request: its prompts and aesthetic scores, the given
    size with crop (0, 0)."""
    return tuple(encode_refiner_conditioning(refiner, text, width=width, height=height, aesthetic_score=score,
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
