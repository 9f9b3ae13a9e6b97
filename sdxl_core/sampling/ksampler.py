"""ComfyUI's KSampler / KSamplerAdvanced on an SDXL stage: one run over a step range of an N-step grid.

Latents enter and leave in ComfyUI's LATENT form, `{"samples": [B, 4, H/8, W/8]}` holding UNSCALED VAE latents on
the CPU; the run scales them by the SDXL latent factor on the way in and out (ComfyUI
`latent_formats.SDXL.process_in/out`). The steps follow ComfyUI's `KSampler.sample` so that a workflow's numbers
mean the same here: the grid from the scheduler (with `denoise`), the step range, the seeded initial noise, the
guided denoiser, the sampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..conditioning import ConditioningMismatch, adm_vector, check_conditioning_for, micro_conditioning_scalars
from ..models.bundle import SDXLModel
from ..operations import compute_dtype_of
from .control import CONTROL_OPTION, control_schedule
from .guidance import CFGDenoiser, WeightedConditioning
from .inpaint import INPAINT_UNET_CHANNELS, NOISE_MASK, InpaintConcat, InpaintingDenoiser, prepare_denoise_mask
from .model_sampling import model_sampling_for, rescale_cfg_for
from .noise import prepare_noise
from .regions import resolve_region
from .samplers import integrate, run_sampler
from .schedules import ksampler_sigmas, sigmas_for_range
from .settings import SamplingSettings

StepCallback = Callable[[dict], None]
Cancel = Callable[[], bool]


def sample_latent(model: SDXLModel, latent: dict, positive: list, negative: list, settings: SamplingSettings, *,
                  start_step: int = 0, end_step: int | None = None, add_noise: bool = True,
                  return_with_leftover_noise: bool = False, sigmas: torch.Tensor | None = None,
                  callback: StepCallback | None = None, cancel: Cancel | None = None) -> dict:
    """Run one stage over steps [start_step, end_step) of the `settings.steps`-step grid, with ComfyUI
    KSamplerAdvanced semantics (`add_noise`, `return_with_leftover_noise`) and KSampler's `denoise` for img2img.

    `sigmas` replaces the scheduler's grid (ComfyUI SamplerCustom's SIGMAS input); the step range still applies.
    A `noise_mask` on the latent inpaints as KSampler does (sampling/inpaint.py) and stays on the returned latent.
    """
    samples = _check_latent(latent, model)
    mask = prepare_denoise_mask(latent[NOISE_MASK], samples.shape) if NOISE_MASK in latent else None
    if end_step is not None and start_step >= end_step:
        raise ValueError(f"start step {start_step} must come before end step {end_step} (of {settings.steps} steps)")
    schedule = model_sampling_for(model.config).schedule
    if sigmas is None:
        sigmas = ksampler_sigmas(schedule, settings.scheduler, settings.sampler, settings.steps, settings.denoise)
    elif settings.denoise != 1.0:
        raise ValueError(f"denoise={settings.denoise} shapes the scheduler's grid, but an explicit sigmas grid was "
                         "given; cut the grid itself (e.g. its last steps + 1 sigmas) for a partial denoise")
    sigmas = sigmas_for_range(sigmas, start_step, end_step, leftover_noise=return_with_leftover_noise)
    if len(sigmas) < 2:
        return {**latent, "samples": samples.clone()}

    device, _ = _unet_device_dtype(model)
    seed = settings.seed
    noise = prepare_noise(samples, seed, latent.get("batch_index")) if add_noise else torch.zeros_like(samples)
    noise = noise.to(device)
    mask = None if mask is None else mask.to(device)
    scale = model.config.vae.scale_factor
    start = samples.to(device) * scale
    concat = None
    if model.config.unet.in_channels == INPAINT_UNET_CHANNELS:
        concat = InpaintConcat(start, mask, scale)
    denoiser = guided_denoiser(model, positive, negative, settings.cfg, tuple(samples.shape[-2:]),
                               rescale=rescale_cfg_for(model, settings.rescale_cfg), concat=concat)
    if mask is not None:  # inpainting: only the masked region is sampled (sampling/inpaint.py)
        denoiser = InpaintingDenoiser(denoiser, start, noise, mask)
    with torch.inference_mode():
        x = run_sampler(settings.sampler, denoiser, start, noise, sigmas,
                        sigma_max=schedule.sigma_max, seed=seed, callback=callback, cancel=cancel,
                        schedule=schedule)
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
    denoiser = guided_denoiser(model, positive, negative, cfg, tuple(x.shape[-2:]))
    with torch.inference_mode():
        return integrate(sampler, denoiser, x.to(device), sigmas.to(device), seed=seed, callback=callback,
                         cancel=cancel, schedule=model_sampling_for(model.config).schedule)


def validate_conditioning_for(model: SDXLModel, conditioning: list, role: str = "positive") -> None:
    """Raise ConditioningMismatch, in a sentence, unless a CONDITIONING was made for this model's stage."""
    check_conditioning_for(model.config, conditioning, role)


def guided_denoiser(model: SDXLModel, positive: list, negative: list, cfg: float,
                    latent_hw: tuple[int, int], rescale: float = 0.0,
                    concat: InpaintConcat | None = None) -> CFGDenoiser:
    """x -> guided x0 for this stage: the UNet as a denoiser of the model's prediction type, both conditionings
    (each side the strength-weighted mean of its entries), one batched call per step where the entries' token
    lengths allow; `rescale` is RescaleCFG's multiplier (0: plain CFG)."""
    device, dtype = _unet_device_dtype(model)
    sampling = model_sampling_for(model.config)
    cond = _branch(model, positive, "positive", latent_hw, device, concat)
    uncond = _branch(model, negative, "negative", latent_hw, device, concat)
    return CFGDenoiser(sampling.denoiser(_UNetCall(model.unet), dtype=dtype), cond, uncond, cfg, rescale=rescale)


def _branch(model: SDXLModel, conditioning: list, role: str, latent_hw: tuple[int, int],
            device: torch.device, concat: InpaintConcat | None = None) -> list[WeightedConditioning]:
    """The UNet inputs (context, y) of each entry of one side of guidance, with its strength and sigma range
    (ComfyUI `samplers.calculate_start_end_timesteps`: percentages of the model's schedule, not of the steps)."""
    check_conditioning_for(model.config, conditioning, role)
    schedule = model_sampling_for(model.config).schedule
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
            gating["sigma_start"] = schedule.percent_to_sigma(options["start_percent"])
        if "end_percent" in options:
            gating["sigma_end"] = schedule.percent_to_sigma(options["end_percent"])
        if CONTROL_OPTION in options:
            gating["control"] = control_schedule(options[CONTROL_OPTION], schedule, model.config.unet, which)
        if (region := resolve_region(options, latent_hw, which)) is not None:
            gating["region"] = region  # an area and/or mask (sampling/regions.py)
        inputs = {"context": context.to(device), "y": y.to(device)}
        if concat is not None:  # an inpainting UNet's mask and masked-image channels (sampling/inpaint.py)
            if region is not None:
                raise ValueError(f"{which} has an area or mask, which these samplers do not combine with an "
                                 "inpainting (9-channel) UNet; use a regular SDXL base for regional prompts")
            inputs["c_concat"] = concat.for_options(options, which).to(device)
        entries.append(WeightedConditioning(inputs, strength=float(options.get("strength", 1.0)), **gating))
    return entries


def _unet_device_dtype(model: SDXLModel) -> tuple[torch.device, torch.dtype]:
    """Where the UNet runs and what it computes in (not necessarily its weights' storage dtype)."""
    return next(model.unet.parameters()).device, compute_dtype_of(model.unet)


class _UNetCall:
    """The UNet as the `network(x_in, t, context=, y=) -> output` callable the denoisers wrap."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, *, context: torch.Tensor, y: torch.Tensor,
                 control=None, c_concat: torch.Tensor | None = None):
        # `control` (sampling/control.py ControlAtStep) runs the ControlNets on this call's own inputs; they see
        # the 4 latent channels, the UNet also an inpainting model's extra ones (ComfyUI `_apply_model`).
        residuals = None if control is None else control(x_in, t, context, y)
        if c_concat is not None:
            x_in = torch.cat([x_in, c_concat.to(x_in.dtype)], dim=1)
        if residuals is None:
            return self.unet(x_in, t, context, y)
        return self.unet(x_in, t, context, y, control=residuals)


def _check_latent(latent: dict, model: SDXLModel) -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise ValueError("expected a LATENT dict with a 'samples' tensor")
    samples = latent["samples"]
    channels = model.config.vae.latent_channels
    if samples.ndim != 4 or samples.shape[1] != channels:
        raise ValueError(f"expected SDXL latents of shape [batch, {channels}, height/8, width/8], "
                         f"got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("the input latent contains NaN or infinite values")
    return samples
