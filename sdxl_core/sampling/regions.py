"""Areas and masks on conditioning: regional prompting as ComfyUI's sampler runs it.

ConditioningSetArea / SetAreaPercentage put an `area` (height, width, y, x) on an entry, ConditioningSetMask a
`mask` with its `mask_strength` and `set_area_to_bounds`. Before sampling each is resolved once against the latent
(`resolve_region`; ComfyUI `resolve_areas_and_cond_masks_multidim`): percentages become latent cells, masks are
resized bilinearly to the latent, and "mask bounds" turns the mask's bounding box into the area. Every side of
guidance gets a twin of each area of the other side (`mirror_areas`; `create_cond_with_same_area_if_none`), so that
both sides predict the same windows. At each step an entry sees only its window of the latent and contributes
x0 times its weight (mask x mask strength x strength, or strength with feathered edges for a plain area) there; a
side's prediction is the weighted sum over its entries divided by the summed weights (`get_area_and_mult`,
`_calc_cond_batch`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AREA_OPTIONS = frozenset({"area", "mask", "mask_strength", "set_area_to_bounds"})
# Width in latent cells of the linear ramp at the inner edges of a plain area (ComfyUI's `fuzz`).
AREA_FEATHER = 8
# The smallest side of an area taken from a mask's bounds, in latent cells.
MIN_BOUNDS_SIDE = 8
# ComfyUI starts every side's summed weight here, so that a pixel no entry covers divides 0 by it and gives 0.
EMPTY_WEIGHT = 1e-37


@dataclass(frozen=True)
class Region:
    """Where an entry applies, resolved for one latent size: `area` = (height, width, y, x) in latent cells
    (unclipped), `mask` = [B or 1, h, w] at latent resolution times nothing yet, `mask_strength` its factor."""

    area: tuple[int, int, int, int] | None = None
    mask: torch.Tensor | None = None
    mask_strength: float = 1.0

    def view(self, x: torch.Tensor, strength: float) -> RegionView:
        """This region's window of `x` and the weight of the entry's x0 there, for one step."""
        batch, channels, height, width = x.shape
        window = None
        input_x = x
        if self.area is not None:
            area_h, area_w, top, left = self.area
            area_h, area_w = min(height - top, area_h), min(width - left, area_w)
            window = (top, left, area_h, area_w)
            input_x = x[:, :, top:top + area_h, left:left + area_w]
        if self.mask is not None:
            mask = self.mask[:batch]
            if batch % mask.shape[0]:
                raise ValueError(f"a conditioning mask has {mask.shape[0]} images for a latent batch of {batch}; "
                                 "give one mask, or one per latent")
            if window is not None:
                top, left, area_h, area_w = window
                mask = mask[:, top:top + area_h, left:left + area_w]
            mask = mask * self.mask_strength
            weight = mask.unsqueeze(1).repeat(batch // mask.shape[0], channels, 1, 1)
        else:
            weight = torch.ones_like(input_x)
        weight = weight * strength
        if self.mask is None and window is not None:
            _feather_inner_edges(weight, window, (height, width))
        return RegionView(input_x, weight, window)


@dataclass(frozen=True)
class RegionView:
    input_x: torch.Tensor
    weight: torch.Tensor
    window: tuple[int, int, int, int] | None  # (top, left, height, width), clipped to the latent


def _feather_inner_edges(weight: torch.Tensor, window: tuple[int, int, int, int],
                         latent_hw: tuple[int, int]) -> None:
    """Ramp the weight linearly over up to AREA_FEATHER cells at every window edge that lies inside the latent, so
    that neighbouring areas blend instead of meeting at a seam (in place; corners are ramped by both sides)."""
    top, left, area_h, area_w = window
    for dim, (offset, size, full) in enumerate(((top, area_h, latent_hw[0]), (left, area_w, latent_hw[1]))):
        ramp = min(AREA_FEATHER, weight.shape[2 + dim] // 4)
        for t in range(ramp):
            factor = (1.0 / ramp) * (t + 1)
            if offset != 0:
                weight.narrow(2 + dim, t, 1).mul_(factor)
            if offset + size < full:
                weight.narrow(2 + dim, size - 1 - t, 1).mul_(factor)


def resolve_region(options: Mapping, latent_hw: tuple[int, int], where: str) -> Region | None:
    """The Region of one CONDITIONING entry's options for latents of `latent_hw`, or None without area/mask."""
    if not AREA_OPTIONS & set(options) or ("area" not in options and "mask" not in options):
        return None
    height, width = latent_hw
    area = options.get("area")
    if area is not None:
        area = _resolve_area(area, latent_hw, where)
    mask = options.get("mask")
    mask_strength = options.get("mask_strength", 1.0)
    if not (isinstance(mask_strength, (int, float)) and math.isfinite(mask_strength)):
        raise ValueError(f"{where}'s mask_strength must be a finite number, got {mask_strength!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}'s mask must be a MASK [height, width] or [batch, height, width], got {shape}")
        if not torch.isfinite(mask).all():
            raise ValueError(f"{where}'s mask contains NaN or infinite values")
        mask = mask.float().unsqueeze(0) if mask.ndim == 2 else mask.float()
        if tuple(mask.shape[1:]) != (height, width):
            mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear").squeeze(1)
        if options.get("set_area_to_bounds", False):
            area = _mask_bounds(mask)
    return Region(area=area, mask=mask, mask_strength=float(mask_strength))


def _resolve_area(area, latent_hw: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    if isinstance(area, (tuple, list)) and len(area) == 5 and area[0] == "percentage":
        fractions = area[1:]
        if not all(isinstance(f, (int, float)) and 0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"{where}'s area percentages must lie in [0, 1], got {tuple(fractions)}")
        h, w, y, x = fractions
        # Python's round (half to even) is what ComfyUI uses here.
        return (max(1, round(h * latent_hw[0])), max(1, round(w * latent_hw[1])), round(y * latent_hw[0]),
                round(x * latent_hw[1]))
    if not (isinstance(area, (tuple, list)) and len(area) == 4 and all(isinstance(v, int) for v in area)):
        raise ValueError(f"{where}'s area must be (height, width, y, x) in latent cells or ('percentage', h, w, y, "
                         f"x), got {area!r}")
    h, w, y, x = area
    if h < 1 or w < 1 or y < 0 or x < 0 or y >= latent_hw[0] or x >= latent_hw[1]:
        raise ValueError(f"{where}'s area {h}x{w} at ({y}, {x}) latent cells does not overlap the "
                         f"{latent_hw[0]}x{latent_hw[1]} latent")
    return (h, w, y, x)


def _mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """The bounding box of the mask's non-zero cells over the batch, at least MIN_BOUNDS_SIDE cells a side; an
    empty mask gets the smallest area (it weighs nothing anyway)."""
    covered = mask.abs().amax(dim=0) != 0
    if not covered.any():
        return (MIN_BOUNDS_SIDE, MIN_BOUNDS_SIDE, 0, 0)
    rows, cols = torch.where(covered)
    top, left = int(rows.min()), int(cols.min())
    return (max(MIN_BOUNDS_SIDE, int(rows.max()) - top + 1), max(MIN_BOUNDS_SIDE, int(cols.max()) - left + 1),
            top, left)


def _contains(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return outer[2] <= inner[2] and outer[3] <= inner[3] and \
        inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3]


def _area_of(entry) -> tuple[int, int, int, int] | None:
    return None if entry.region is None else entry.region.area


def mirror_areas(sides: Sequence[list]) -> list[list]:
    """Give every side a twin of each area entry of the other sides: the area entry's region, weights and gating
    with the text inputs of the side's smallest entry covering that area (or its first entry without an area), unless
    that entry already has exactly this area. Sides are processed in order and see the twins added before them."""
    sides = [list(side) for side in sides]
    for index, side in enumerate(sides):
        for entry in side:  # grows while looping when a later side adds twins here: they are mirrored too
            area = _area_of(entry)
            if area is None:
                continue
            for other_index, other in enumerate(sides):
                if other_index != index:
                    _add_twin(other, entry, area)
    return sides


def _add_twin(side: list, entry, area: tuple[int, int, int, int]) -> None:
    smallest = None
    for candidate in side:
        candidate_area = _area_of(candidate)
        if candidate_area is not None:
            if _contains(candidate_area, area) and (smallest is None or _area_of(smallest) is None or
                                                    math.prod(_area_of(smallest)[:2]) > math.prod(candidate_area[:2])):
                smallest = candidate
        elif smallest is None:
            smallest = candidate
    if smallest is None or _area_of(smallest) == area:
        return
    side.append(dataclasses.replace(entry, cond=smallest.cond))


def combine_regions(x: torch.Tensor, parts: Sequence[tuple[float, torch.Tensor, RegionView | None]]) -> torch.Tensor:
    """A side's x0: Σ weight·x0 / Σ weight over its entries, each over its window (an entry without a region
    weighs its strength everywhere)."""
    total = torch.zeros_like(x)
    weights = torch.full_like(x, EMPTY_WEIGHT)
    for strength, x0, view in parts:
        if view is None:
            weight = torch.ones_like(x) * strength
            total += x0 * weight
            weights += weight
            continue
        target, target_weights = total, weights
        if view.window is not None:
            top, left, h, w = view.window
            target = total[:, :, top:top + h, left:left + w]
            target_weights = weights[:, :, top:top + h, left:left + w]
        target += x0 * view.weight
        target_weights += view.weight
    return total / weights
