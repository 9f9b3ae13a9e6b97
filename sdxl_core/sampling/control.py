"""ControlNet during sampling, as ComfyUI's Apply ControlNet (Advanced) sets it up and its sampler runs it.

`apply_controlnet` puts a `ControlNetApplication` on every entry of a positive and a negative CONDITIONING under
the "control" option (ComfyUI `nodes.ControlNetApplyAdvanced`): applying a second ControlNet chains it to the first,
and entries that had the same control before share the same new one, so positive and negative still run in one
batched call. While sampling, each UNet call asks the entry's chain for residuals (ComfyUI `ControlNet.get_control`):
every link active at the step's sigma runs its network on the UNet's own scaled input, timestep, context and ADM
vector, scales the result by its strength, and the chain's results are summed (`ControlBase.control_merge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..models.controlnet import ControlNetModel
from ..models.unet import ControlResiduals
from .resize import center_crop_resize

CONTROL_OPTION = "control"
# ComfyUI resizes the control image with this torch interpolation mode (`ControlBase.upscale_algorithm`).
HINT_RESIZE_MODE = "nearest-exact"


@dataclass(eq=False)  # compared by identity, as ComfyUI batches entries only when they share the control object
class ControlNetApplication:
    """One ControlNet with its control image, strength and schedule range; `previous` is the one applied before."""

    network: ControlNetModel
    image: torch.Tensor  # IMAGE layout: [B, H, W, C] floats in 0..1
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    previous: ControlNetApplication | None = None
    _hints: dict = field(default_factory=dict, repr=False)  # resized hints per (size, device, dtype)
    _schedule: tuple | None = field(default=None, repr=False)  # (schedule, its ControlSchedule), see control_schedule

    def __post_init__(self) -> None:
        if not isinstance(self.network, ControlNetModel):
            raise TypeError(f"expected an sdxl_core ControlNetModel, got {type(self.network).__name__}")
        if not (math.isfinite(self.strength) and self.strength >= 0.0):
            raise ValueError(f"the ControlNet strength must be a finite number >= 0, got {self.strength}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"the ControlNet range {self.start_percent:g}..{self.end_percent:g} is not "
                             "0 <= start_percent <= end_percent <= 1")
        image = self.image
        channels = self.network.config.hint_channels
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != channels:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"the control image must be an IMAGE [batch, height, width, {channels}], got {shape}")
        if not torch.isfinite(image).all():
            raise ValueError("the control image contains NaN or infinite values")

    def chain(self) -> list[ControlNetApplication]:
        """This application and the ones before it, the first applied first."""
        links, link = [], self
        while link is not None:
            links.append(link)
            link = link.previous
        return links[::-1]

    def hint_for(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The control image as [B, C, height, width]: centre-cropped to the aspect ratio, then resized
        (ComfyUI `common_upscale(..., "nearest-exact", "center")`); cached, as ComfyUI keeps `cond_hint`."""
        key = (height, width, device, dtype)
        if key not in self._hints:
            self._hints[key] = resize_hint(self.image.movedim(-1, 1), height, width).to(device=device, dtype=dtype)
        return self._hints[key]


def resize_hint(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, height, width]: cut the longer side's excess equally from both ends so the aspect
    ratio matches, then resize with nearest-exact sampling."""
    return center_crop_resize(image, height, width, HINT_RESIZE_MODE)


def broadcast_hint(hint: torch.Tensor, batch: int, chunks: int) -> torch.Tensor:
    """A control-image batch laid out for a model batch of `chunks` conditioning chunks of `batch // chunks`
    latents each: every chunk gets the images in order, cycled when there are fewer images than latents
    (ComfyUI `broadcast_image_to`). One image, or as many as the model batch, is left as it is."""
    if hint.shape[0] in (1, batch):
        return hint
    per_chunk = batch // chunks
    images = hint[:per_chunk]
    if per_chunk > images.shape[0]:
        repeats, rest = divmod(per_chunk, images.shape[0])
        images = torch.cat([images] * repeats + [images[:rest]])
    return images if images.shape[0] == batch else torch.cat([images] * chunks)


class ControlAtStep:
    """An entry's control chain at one sigma: called with the UNet's inputs, it returns the summed residuals of
    the links active there (None when none is)."""

    def __init__(self, links: list[ControlNetApplication], chunks: int):
        self.links = links
        self.chunks = chunks

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor) -> ControlResiduals | None:
        parts = []
        for link in self.links:
            scale = link.network.config.hint_downscale
            hint = link.hint_for(x_in.shape[-2] * scale, x_in.shape[-1] * scale, x_in.device, link.network.dtype)
            hint = broadcast_hint(hint, x_in.shape[0], self.chunks)
            parts.append(link.network(x_in, t, context, y, hint).scaled(link.strength))
        return ControlResiduals.summed(parts) if parts else None


class ControlSchedule:
    """An entry's control chain with each link's sigma range resolved on the model's schedule; `at(sigma,
    chunks)` gives the chain for one model call (ComfyUI gates on the first batch item's sigma)."""

    def __init__(self, application: ControlNetApplication, percent_to_sigma: Callable[[float], float]):
        self.links = [(link, percent_to_sigma(link.start_percent), percent_to_sigma(link.end_percent))
                      for link in application.chain()]

    def at(self, sigma: float, chunks: int) -> ControlAtStep | None:
        active = [link for link, sigma_start, sigma_end in self.links if sigma_end <= sigma <= sigma_start]
        return ControlAtStep(active, chunks) if active else None


def apply_controlnet(positive: list, negative: list, network: ControlNetModel, image: torch.Tensor,
                     strength: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0
                     ) -> tuple[list, list]:
    """(positive, negative) with the ControlNet applied to every entry of both (ComfyUI Apply ControlNet
    (Advanced)); strength 0 returns them unchanged, as ComfyUI does."""
    if strength == 0:
        return positive, negative
    made: dict[int, ControlNetApplication] = {}
    outputs = []
    for conditioning in (positive, negative):
        entries = []
        for context, options in conditioning:
            previous = options.get(CONTROL_OPTION)
            if previous is not None and not isinstance(previous, ControlNetApplication):
                raise ValueError(f"this conditioning already carries a {type(previous).__name__} control, which "
                                 "the sdxl_core sampler cannot chain; apply ControlNets with sdxl_core only")
            key = id(previous)
            if key not in made:
                made[key] = ControlNetApplication(network, image, float(strength), float(start_percent),
                                                  float(end_percent), previous)
            entries.append([context, {**options, CONTROL_OPTION: made[key]}])
        outputs.append(entries)
    return outputs[0], outputs[1]


def controlnets_in(*conditionings: list) -> list[ControlNetModel]:
    """The ControlNet networks the entries of these CONDITIONINGs will run (each once, in chain order), so a caller
    can put them on the compute device next to the UNet before sampling. Controls of other kinds are left to the
    sampler, which refuses them with a sentence (`control_schedule`)."""
    found: dict[int, ControlNetModel] = {}
    for conditioning in conditionings:
        for _, options in conditioning:
            control = options.get(CONTROL_OPTION)
            if isinstance(control, ControlNetApplication):
                for link in control.chain():
                    found.setdefault(id(link.network), link.network)
    return list(found.values())


def check_control_fits(application: ControlNetApplication, unet_config, where: str) -> None:
    """Refuse, before sampling, a ControlNet whose encoder does not match the UNet it would steer."""
    for link in application.chain():
        cfg = link.network.config.unet
        mismatches = [f"{name} {getattr(cfg, name)} vs {getattr(unet_config, name)}" for name in
                      ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
                      if getattr(cfg, name) != getattr(unet_config, name)]
        if mismatches:
            raise ValueError(f"the ControlNet on {where} was made for another UNet ({', '.join(mismatches)}); "
                             "SDXL ControlNets steer the SDXL base, not the refiner")


def control_schedule(control: object, schedule, unet_config, where: str) -> ControlSchedule:
    """The sampler's view of an entry's "control" option: checked against the UNet and resolved on `schedule`
    (anything with `percent_to_sigma`). Entries that share an application share one ControlSchedule, so they
    still batch together."""
    if not isinstance(control, ControlNetApplication):
        raise ValueError(f"{where} carries a {type(control).__name__} under 'control', which the sdxl_core sampler "
                         "cannot run (ComfyUI's own ControlNet objects are not supported by these samplers yet); "
                         "apply the ControlNet with sdxl_core's apply_controlnet, or sample with ComfyUI's KSampler")
    check_control_fits(control, unet_config, where)
    cached = control._schedule
    if cached is None or cached[0] is not schedule:
        control._schedule = (schedule, ControlSchedule(control, schedule.percent_to_sigma))
    return control._schedule[1]


class ControlNetUse(NamedTuple):
    """One Apply ControlNet (Advanced) to make: what `apply_controlnets` takes (the command line's --controlnet)."""

    network: ControlNetModel
    image: torch.Tensor  # IMAGE [B, H, W, 3] in 0..1
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0


def apply_controlnets(positive: list, negative: list, uses: Sequence[ControlNetUse]) -> tuple[list, list]:
    """`apply_controlnet` for each use in order (the first applied is the first of the chain)."""
    for use in uses:
        positive, negative = apply_controlnet(positive, negative, *use)
    return positive, negative
