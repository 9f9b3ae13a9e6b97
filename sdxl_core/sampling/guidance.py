"""Classifier-free guidance as a denoiser wrapper: one batched model call for both branches.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", applied to x0 as ComfyUI does (`samplers.cfg_function`;
sgm `VanillaCFG`): x0 = uncond + (cond - uncond) * cfg, which equals guidance on eps because x0 is affine in eps
at a fixed sigma. Conditioning per branch is a dict of tensors (`context`, `y`) that is concatenated key by key.

A side of guidance may hold several weighted entries (ComfyUI's ConditioningCombine): each is evaluated and the
side's prediction is their strength-weighted mean, entries gated by a sigma range taking part only inside it
(ComfyUI `samplers._calc_cond_batch` / `get_area_and_mult`). Entries with an area or mask weigh their prediction
only over their window (sampling/regions.py); entries with a ControlNet hand it to the model (sampling/control.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .denoiser import per_item_sigma
from .regions import Region, combine_regions, mirror_areas

Denoiser = Callable[..., torch.Tensor]
Conditioning = Mapping[str, torch.Tensor]

# Keys holding cross-attention tokens [B, T, C]; branches with different T are padded by repetition.
CROSS_ATTENTION_KEYS = frozenset({"context"})
# ComfyUI batches two token lengths only when the repetition factor to their LCM is at most this
# (`conds.CONDCrossAttn.can_concat`); beyond it the branches run as separate calls.
MAX_TOKEN_REPEAT = 4


@dataclass(frozen=True)
class WeightedConditioning:
    """One entry of a side of guidance: its UNet inputs, its weight in the side's mean, and the sigmas where it
    applies (ComfyUI `strength`, and `timestep_start`/`timestep_end` from `percent_to_sigma`)."""

    cond: Conditioning
    strength: float = 1.0
    sigma_start: float = math.inf  # the entry sits out while sigma is above this ...
    sigma_end: float = 0.0  # ... or below this
    # Model input that is not a tensor: `control.at(sigma, chunks, x=, sigmas=)` gives the denoiser's `control=`
    # argument for one call of `chunks` batched entries (x, sigmas: that call's input), or None (sampling/control.py
    # `ControlSchedule`, `ExternalControl`). Entries batch together only when they share the same control object, as
    # in ComfyUI.
    control: object | None = None
    # Where the entry applies (sampling/regions.py Region: an area and/or mask); None = the whole latent.
    region: Region | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0.0):
            raise ValueError(f"a conditioning strength must be a finite number >= 0, got {self.strength}")

    @property
    def gated(self) -> bool:
        return self.sigma_start != math.inf or self.sigma_end != 0.0

    def active_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


Side = Conditioning | Sequence[WeightedConditioning]


class CFGDenoiser:
    """Guided denoiser `(x, sigma) -> x0` over an inner `denoiser(x, sigma, **cond) -> x0` (ComfyUI
    `sampling_function`): one call on [uncond; cond], or the cond branch alone when cfg == 1.

    `cond` / `uncond` are one conditioning dict or a list of WeightedConditioning entries; all entries active at a
    step run in as few batched calls as their token lengths allow (unconditional first, as ComfyUI orders them).
    """

    def __init__(self, denoiser: Denoiser, cond: Side, uncond: Side | None, cfg: float, rescale: float = 0.0):
        self.denoiser = denoiser
        self.cond = _entries(cond, "cond")
        self.uncond = None if uncond is None else _entries(uncond, "uncond")
        self.cfg = float(cfg)
        if not (math.isfinite(rescale) and 0.0 <= rescale <= 1.0):
            raise ValueError(f"the RescaleCFG multiplier must lie in [0, 1] (0 is plain CFG, 0.7 the usual value "
                             f"for v-prediction models), got {rescale}")
        self.rescale = float(rescale)
        # ComfyUI skips the unconditional pass when cfg is 1 (its "cfg1 optimization"): the result is the same.
        self.skips_uncond = math.isclose(self.cfg, 1.0)
        if self.uncond is None and not self.skips_uncond:
            raise ValueError(f"cfg={self.cfg} needs an unconditional (negative) conditioning; only cfg=1 runs without")
        if self.uncond is not None:
            # Both sides predict the same windows: each area gets a twin on the other side (ComfyUI process_conds).
            self.cond, self.uncond = mirror_areas([self.cond, self.uncond])
        keys = {frozenset(entry.cond) for entry in self.cond + (self.uncond or [])}
        if len(keys) > 1:
            raise ValueError(f"cond and uncond must carry the same keys, got {sorted(sorted(k) for k in keys)}")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = per_item_sigma(sigma, x)
        if self.skips_uncond:
            cond_x0 = self._side_predictions(x, sigma, [self.cond])[0]
            if not self.rescale:
                return cond_x0 * self.cfg
            # ComfyUI's skipped branch reads as a zero prediction, which RescaleCFG then combines.
            return self._combine(x, sigma, cond_x0, torch.zeros_like(cond_x0))
        uncond_x0, cond_x0 = self._side_predictions(x, sigma, [self.uncond, self.cond])
        return self._combine(x, sigma, cond_x0, uncond_x0)

    def _combine(self, x: torch.Tensor, sigma: torch.Tensor, cond_x0: torch.Tensor,
                 uncond_x0: torch.Tensor) -> torch.Tensor:
        if self.rescale:
            return rescaled_cfg(x, sigma, cond_x0, uncond_x0, self.cfg, self.rescale)
        return uncond_x0 + (cond_x0 - uncond_x0) * self.cfg

    def with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided x0, unconditional x0): the hook a CFG++ sampler steps with (ComfyUI hands `uncond_denoised` to a
        `sampler_post_cfg_function`). Both branches run even at cfg 1, as ComfyUI's `disable_cfg1_optimization`
        makes them; without a negative side the unconditional prediction is the conditional one."""
        sigma = per_item_sigma(sigma, x)
        if self.uncond is None:
            cond_x0 = self._side_predictions(x, sigma, [self.cond])[0]
            return self._combine(x, sigma, cond_x0, cond_x0), cond_x0
        uncond_x0, cond_x0 = self._side_predictions(x, sigma, [self.uncond, self.cond])
        return self._combine(x, sigma, cond_x0, uncond_x0), uncond_x0

    def _side_predictions(self, x: torch.Tensor, sigma: torch.Tensor,
                          sides: list[list[WeightedConditioning]]) -> list[torch.Tensor]:
        """Each side's strength-weighted mean x0 over its entries active at this sigma."""
        batch = x.shape[0]
        active = sides
        entries = [entry for side in sides for entry in side]
        # The first item's sigma as a number, read from the device once per call and only when an entry needs it.
        now = float(sigma[0]) if any(entry.gated or entry.control is not None for entry in entries) else None
        if any(entry.gated for entry in entries):
            # ComfyUI gates every entry on the first item's sigma (`get_area_and_mult`: timestep_in[0]).
            active = [[entry for entry in side if entry.active_at(now)] for side in sides]
        runs = [(index, entry, expand_to_batch(entry.cond, batch)) for index, side in enumerate(active)
                for entry in side]
        # An entry with an area or mask sees only its window of x and weighs its x0 there (sampling/regions.py).
        views = [None if entry.region is None else entry.region.view(x, entry.strength) for _, entry, _ in runs]
        inputs = [x if view is None else view.input_x for view in views]
        # Entries share a call only with the same control object and the same input size, as in ComfyUI.
        keys = [(id(entry.control) if entry.control is not None else None, tuple(inputs[i].shape))
                for i, (_, entry, _) in enumerate(runs)]
        x0s: list[torch.Tensor | None] = [None] * len(runs)
        for group in _batchable_groups([cond for _, _, cond in runs], keys):
            control = runs[group[0]][1].control
            if len(group) == 1:
                x_in, sigma_in, cond = inputs[group[0]], sigma, runs[group[0]][2]
            else:
                x_in, sigma_in = torch.cat([inputs[i] for i in group]), torch.cat([sigma] * len(group))
                cond = concat_conditioning(*(runs[i][2] for i in group))
            extra = {}
            if control is not None and (bound := control.at(now, len(group), x=x_in, sigmas=sigma_in)) is not None:
                extra["control"] = bound
            x0 = self.denoiser(x_in, sigma_in, **cond, **extra)
            for i, chunk in zip(group, x0.split(batch) if len(group) > 1 else [x0]):
                x0s[i] = chunk
        predictions = []
        for index, _side in enumerate(active):
            members = [(entry.strength, x0, view) for (i, entry, _), x0, view in zip(runs, x0s, views) if i == index]
            if any(view is not None for _, _, view in members):
                predictions.append(combine_regions(x, members))
            else:
                predictions.append(_weighted_mean([(strength, x0) for strength, x0, _ in members], x))
        return predictions


def rescaled_cfg(x: torch.Tensor, sigma: torch.Tensor, cond_x0: torch.Tensor, uncond_x0: torch.Tensor, cfg: float,
                 multiplier: float) -> torch.Tensor:
    """CFG with the guided prediction's std rescaled to the conditional one's (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", eq. 15-16), blended by `multiplier`; done on v of the VP model
    as ComfyUI's RescaleCFG node does it (`comfy_extras/nodes_model_advanced.py`), op for op."""
    s = sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))
    reduce = tuple(range(1, x.ndim))
    x_vp = x / (s * s + 1.0)
    eps_cond, eps_uncond = x - cond_x0, x - uncond_x0
    v_cond = ((x_vp - (x - eps_cond)) * (s**2 + 1.0) ** 0.5) / s
    v_uncond = ((x_vp - (x - eps_uncond)) * (s**2 + 1.0) ** 0.5) / s
    v_cfg = v_uncond + cfg * (v_cond - v_uncond)
    v_rescaled = v_cfg * (torch.std(v_cond, dim=reduce, keepdim=True) / torch.std(v_cfg, dim=reduce, keepdim=True))
    v_final = multiplier * v_rescaled + (1.0 - multiplier) * v_cfg
    return x - (x - (x_vp - v_final * s / (s * s + 1.0) ** 0.5))


def _entries(side: Side, name: str) -> list[WeightedConditioning]:
    if isinstance(side, Mapping):
        return [WeightedConditioning(dict(side))]
    entries = list(side)
    if not entries or not all(isinstance(entry, WeightedConditioning) for entry in entries):
        raise ValueError(f"{name} must be a conditioning dict or a non-empty list of WeightedConditioning")
    return entries


def _weighted_mean(pairs: list[tuple[float, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """Σ strength·x0 / Σ strength (ComfyUI `_calc_cond_batch`); a side with no active entry, or only zero
    strengths, predicts zeros as ComfyUI's accumulator over a 1e-37 count does."""
    if len(pairs) == 1 and pairs[0][0] > 0.0:
        # One entry: its own prediction, untouched, so that plain conditioning gives the same bits as before.
        return pairs[0][1]
    total = sum(strength for strength, _ in pairs)
    if total == 0.0:
        return torch.zeros_like(x)
    out = torch.zeros_like(pairs[0][1])
    for strength, x0 in pairs:
        out += x0 * strength
    return out / total


def _batchable_groups(conds: list[dict[str, torch.Tensor]], keys: list[object] | None = None
                      ) -> list[list[int]]:
    """Indices of the conditionings that share a call: the first one left, with every later one that still fits
    (ComfyUI `_calc_cond_batch` with `can_concat`), until none is left. Token lengths may differ as long as their
    common multiple is within MAX_TOKEN_REPEAT repeats of the shortest; `keys` (what else must match: control
    object, input size) must be equal."""
    keys = keys if keys is not None else [None] * len(conds)
    left = list(range(len(conds)))
    groups = []
    while left:
        group = [left.pop(0)]
        for i in list(left):
            members = [conds[j] for j in group]
            if keys[i] != keys[group[0]]:
                continue
            if all(can_batch(member, conds[i]) for member in members) and _fits_one_call(members + [conds[i]]):
                group.append(i)
                left.remove(i)
        groups.append(group)
    return groups


def _fits_one_call(conds: list[dict[str, torch.Tensor]]) -> bool:
    for key in CROSS_ATTENTION_KEYS & set(conds[0]):
        lengths = [cond[key].shape[1] for cond in conds]
        if math.lcm(*lengths) // min(lengths) > MAX_TOKEN_REPEAT:
            return False
    return True


def expand_to_batch(cond: Conditioning, batch: int) -> dict[str, torch.Tensor]:
    """Repeat batch-1 conditioning to the latent batch (ComfyUI `repeat_to_batch_size` for the common cases)."""
    out = {}
    for key, value in cond.items():
        if value.shape[0] == batch:
            out[key] = value
        elif value.shape[0] == 1:
            # A real copy, not an expand() view, so that the model may reshape it freely.
            out[key] = value.repeat(batch, *([1] * (value.ndim - 1)))
        else:
            raise ValueError(f"conditioning {key!r} has batch {value.shape[0]}; expected 1 or the latent batch {batch}")
    return out


def can_batch(a: Conditioning, b: Conditioning) -> bool:
    """Whether two branches fit one call (ComfyUI `CONDRegular`/`CONDCrossAttn.can_concat`)."""
    for key in a:
        sa, sb = a[key].shape, b[key].shape
        if key in CROSS_ATTENTION_KEYS and sa != sb:
            if len(sa) != 3 or len(sb) != 3 or sa[0] != sb[0] or sa[2] != sb[2]:
                raise ValueError(f"{key!r} shapes {tuple(sa)} and {tuple(sb)} differ beyond the token count")
            if math.lcm(sa[1], sb[1]) // min(sa[1], sb[1]) > MAX_TOKEN_REPEAT:
                return False
        elif sa != sb:
            raise ValueError(f"conditioning {key!r} differs in shape between branches: {tuple(sa)} and {tuple(sb)}")
    return True


def concat_conditioning(*branches: Conditioning) -> dict[str, torch.Tensor]:
    """Batch-concatenate branches key by key; token sequences of different lengths are first repeated to their
    least common multiple, which leaves attention unchanged (ComfyUI `conds.CONDCrossAttn.concat`)."""
    out = {}
    for key in branches[0]:
        values = [branch[key] for branch in branches]
        if key in CROSS_ATTENTION_KEYS:
            length = math.lcm(*(v.shape[1] for v in values))
            values = [v.repeat(1, length // v.shape[1], 1) if v.shape[1] < length else v for v in values]
        out[key] = torch.cat(values)
    return out
