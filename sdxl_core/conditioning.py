"""Micro-conditioning (SDXL paper §2.2–2.3) and the conditioning format shared with ComfyUI.

The UNet's "y" input is the pooled bigG embedding followed by a 256-wide Fourier embedding of each scalar:
original size (h, w), crop top-left (top, left) and target size (h, w) for the base; original size, crop top-left
and aesthetic score for the refiner (sgm GeneralConditioner order; ComfyUI `model_base.SDXL.encode_adm`;
diffusers `_get_add_time_ids`).

Conditioning travels as ComfyUI's CONDITIONING: a list of `[context, options]` pairs whose options carry
`pooled_output` and the micro-conditioning fields under ComfyUI's names, so it mixes with ComfyUI's own nodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import ADM_SCALAR_EMBED_DIM, VAE_DOWNSCALE, SDXLConfig
from .models.timestep_embedding import timestep_embedding

# Aesthetic scores the refiner was conditioned with at inference in the paper's demo, diffusers and ComfyUI.
DEFAULT_POSITIVE_AESTHETIC_SCORE = 6.0
DEFAULT_NEGATIVE_AESTHETIC_SCORE = 2.5

# Conditioning options this core understands. Anything else (GLIGEN, hooks, ...) is refused
# rather than silently ignored. `strength` weighs an entry in its side's mean and `start_percent`/`end_percent`
# limit it to part of the schedule, as in ComfyUI's sampler (see guidance.WeightedConditioning).
_KNOWN_OPTIONS = frozenset({
    "pooled_output", "width", "height", "crop_w", "crop_h", "target_width", "target_height", "aesthetic_score",
    "strength", "start_percent", "end_percent", "prompt_type",
    "control",  # a ControlNet chain (sampling/control.py), checked by the sampler
    "control_apply_to_uncond",  # ComfyUI's flag beside "control"; only its False (Advanced node) value is run
    "area", "mask", "mask_strength", "set_area_to_bounds",  # regional conditioning (sampling/regions.py)
    # InpaintModelConditioning's fields: read by inpainting UNets, unused by the others (as in ComfyUI, which adds
    # them for any model; its noise_mask on the latent is what a regular UNet inpaints with).
    "concat_latent_image", "concat_mask",
})


class ConditioningMismatch(ValueError):
    """Conditioning built for one SDXL stage was given to the other, or is otherwise unusable."""


@dataclass(frozen=True)
class BaseMicroConditioning:
    """Size conditioning of the base model, all in pixels; (height, width) and (top, left) order as in sgm."""

    original_size: tuple[int, int]  # (h, w) the model should believe the training image had before resizing
    crop_top_left: tuple[int, int] = (0, 0)  # (top, left) crop the model should believe was taken; (0, 0) centres
    target_size: tuple[int, int] | None = None  # (h, w) of the training bucket; None = original_size

    def scalars(self) -> tuple[float, ...]:
        target = self.target_size or self.original_size
        return (*map(float, self.original_size), *map(float, self.crop_top_left), *map(float, target))


@dataclass(frozen=True)
class RefinerMicroConditioning:
    """Size and aesthetic conditioning of the refiner (sgm `sd_xl_refiner.yaml` conditioner)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    # None: decided by the side of guidance (6.0 positive, 2.5 negative), as ComfyUI's sampler does.
    aesthetic_score: float | None = None

    def scalars(self) -> tuple[float, ...]:
        if self.aesthetic_score is None:
            raise ValueError("the aesthetic score is still open; micro_conditioning_scalars resolves it by side")
        return (*map(float, self.original_size), *map(float, self.crop_top_left), float(self.aesthetic_score))


def adm_vector(pooled: torch.Tensor, scalars: Sequence[float]) -> torch.Tensor:
    """The UNet's y: pooled text embedding ++ cos-first Fourier embeddings of each scalar (sgm
    `ConcatTimestepEmbedderND`, ComfyUI `SDXL.encode_adm`)."""
    if pooled.ndim != 2:
        raise ValueError(f"pooled embedding must be [batch, width], got shape {tuple(pooled.shape)}")
    values = torch.tensor([float(s) for s in scalars], dtype=torch.float32)
    embedded = timestep_embedding(values, ADM_SCALAR_EMBED_DIM).flatten()
    embedded = embedded.to(device=pooled.device, dtype=pooled.dtype).unsqueeze(0).expand(pooled.shape[0], -1)
    return torch.cat([pooled, embedded], dim=1)


def _stage_of_foreign_context(config: SDXLConfig, width: int) -> str | None:
    """Name the other stage when a context of this width is what that stage's text encoders produce."""
    clip_g = config.clip_g.hidden_size
    if config.kind == "base" and width == clip_g:
        return "refiner"  # the refiner's context is bigG alone
    if config.kind == "refiner" and width > clip_g:
        return "base"  # the base's context is [CLIP-L | bigG], wider than bigG alone
    return None


def check_conditioning_for(config: SDXLConfig, conditioning: list, role: str = "positive") -> None:
    """Raise ConditioningMismatch, in a sentence, unless every entry of a CONDITIONING fits this stage's UNet."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ConditioningMismatch(f"the {role} conditioning is empty; connect a text-encode node to it")
    for index, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ConditioningMismatch(f"{role} conditioning entry {index} is not a [tensor, options] pair")
        context, options = entry
        width = context.shape[-1]
        if width != config.unet.context_dim:
            found = _stage_of_foreign_context(config, width)
            hint = ""
            if found is not None:
                hint = (f": this is {found} conditioning wired into the {config.kind} model; encode the prompt with "
                        f"the {config.kind}'s text encoder")
            raise ConditioningMismatch(
                f"the {role} conditioning has {width}-wide text embeddings but the {config.kind} model expects "
                f"{config.unet.context_dim}{hint}")
        unknown = set(options) - _KNOWN_OPTIONS
        if unknown:
            raise ConditioningMismatch(
                f"the {role} conditioning uses {sorted(unknown)}, which the SDXL two-stage sampler does not support "
                f"(supported options: {sorted(_KNOWN_OPTIONS)})")
        if options.get("control_apply_to_uncond", False):
            raise ConditioningMismatch(
                f"{role} conditioning entry {index} comes from ComfyUI's legacy Apply ControlNet node, which "
                "copies the control onto the negative side at sampling time; use Apply ControlNet (Advanced)")
        start, end = options.get("start_percent", 0.0), options.get("end_percent", 1.0)
        if not (0.0 <= start <= end <= 1.0):
            # ComfyUI's ConditioningSetTimestepRange offers only 0 <= start, end <= 1; start > end never applies.
            raise ConditioningMismatch(
                f"{role} conditioning entry {index} has the timestep range {start:g}..{end:g}; expected "
                "0 <= start_percent <= end_percent <= 1")
        strength = options.get("strength", 1.0)
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0.0):
            raise ConditioningMismatch(
                f"{role} conditioning entry {index} has strength {strength!r}; expected a finite number >= 0")
        pooled = options.get("pooled_output")
        pooled_width = config.unet.adm_in_channels - ADM_SCALAR_EMBED_DIM * len(config.adm_scalars)
        if pooled is None or pooled.shape[-1] != pooled_width:
            found_width = None if pooled is None else pooled.shape[-1]
            raise ConditioningMismatch(
                f"the {role} conditioning needs a {pooled_width}-wide pooled_output from bigG, found {found_width}")


def micro_conditioning_scalars(config: SDXLConfig, options: dict[str, Any], latent_hw: tuple[int, int],
                               negative: bool) -> tuple[float, ...]:
    """The ADM scalars of one conditioning entry, with ComfyUI's defaults (`samplers.encode_model_conds`,
    `SDXL.encode_adm`, `SDXLRefiner.encode_adm`): sizes fall back to the latent size ×8, crops to 0, the target
    to the original size, the aesthetic score to 6.0 (2.5 on the negative side)."""
    height = options.get("height", latent_hw[0] * VAE_DOWNSCALE)
    width = options.get("width", latent_hw[1] * VAE_DOWNSCALE)
    crop = (options.get("crop_h", 0), options.get("crop_w", 0))
    if config.kind == "base":
        target = (options.get("target_height", height), options.get("target_width", width))
        return BaseMicroConditioning((height, width), crop, target).scalars()
    # A conditioning's own prompt_type outranks the side it is wired to (ComfyUI `encode_model_conds`).
    negative = options.get("prompt_type", "negative" if negative else "positive") == "negative"
    default_score = DEFAULT_NEGATIVE_AESTHETIC_SCORE if negative else DEFAULT_POSITIVE_AESTHETIC_SCORE
    return RefinerMicroConditioning((height, width), crop, options.get("aesthetic_score", default_score)).scalars()


def make_base_conditioning(context: torch.Tensor, pooled: torch.Tensor,
                           micro: BaseMicroConditioning | None = None) -> list:
    """A ComfyUI CONDITIONING for the base, as core `CLIPTextEncodeSDXL` builds it. Without `micro` it carries no
    size fields, and the sampler conditions on the latent's own size (ComfyUI `samplers.encode_model_conds`)."""
    options = {"pooled_output": pooled}
    if micro is not None:
        (height, width), (crop_h, crop_w) = micro.original_size, micro.crop_top_left
        target_height, target_width = micro.target_size or micro.original_size
        options.update(width=width, height=height, crop_w=crop_w, crop_h=crop_h, target_width=target_width,
                       target_height=target_height)
    return [[context, options]]


def make_refiner_conditioning(context: torch.Tensor, pooled: torch.Tensor,
                              micro: RefinerMicroConditioning | None = None,
                              aesthetic_score: float | None = None) -> list:
    """A ComfyUI CONDITIONING for the refiner, as core `CLIPTextEncodeSDXLRefiner` builds it (plus the crop).

    Sizes come from `micro` (absent: the latent's size); the aesthetic score from `aesthetic_score`, else `micro`'s;
    with neither the field stays absent and the sampler applies 6.0 to the positive and 2.5 to the negative side.
    """
    options = {"pooled_output": pooled}
    if micro is not None:
        (height, width), (crop_h, crop_w) = micro.original_size, micro.crop_top_left
        options.update(width=width, height=height, crop_w=crop_w, crop_h=crop_h)
        if micro.aesthetic_score is not None:
            options["aesthetic_score"] = float(micro.aesthetic_score)
    if aesthetic_score is not None:
        options["aesthetic_score"] = float(aesthetic_score)
    return [[context, options]]


def with_micro_conditioning(conditioning: list, **fields: Any) -> list:
    """A copy of a CONDITIONING with some micro-conditioning fields replaced (tensors are shared, not copied)."""
    unknown = set(fields) - _KNOWN_OPTIONS
    if unknown:
        raise ValueError(f"unknown conditioning fields {sorted(unknown)}")
    return [[context, {**options, **fields}] for context, options in conditioning]
