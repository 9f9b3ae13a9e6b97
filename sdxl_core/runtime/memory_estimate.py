"""Will this run fit? An estimate made before any weight is read, and a refusal in a sentence when it will not.

A run that does not fit must not start: on a CPU the kernel's out-of-memory killer ends the process without a word,
minutes in, and may take other programs with it. The estimate follows the pipeline's steps as they run
(sdxl_core/runtime/stages.py): each step needs its own networks' weights, read for it, plus its activations; what
the models already hold stays held and is already counted out of the available memory.

    weights       from the checkpoint headers, in the precision they will be held in (`SDXLModel.weight_bytes`)
    UNet          sdxl_core/runtime/residency.py: elements per latent cell, for the guidance batch (2 x batch)
    VAE decode    sdxl_core/runtime/vae_decoding.py: elements per pixel per channel, untiled
    images        the decoded float images and their conversions (what a 16384² image alone costs: 3 GiB each)

Available memory: on a CPU the kernel's MemAvailable, capped by the cgroup's limit (a container's, or a systemd
slice's); on a GPU what PyTorch can still allocate there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .residency import UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL
from .stages import stage_components
from .vae_decoding import available_device_memory, estimate_decode_bytes

logger = logging.getLogger(__name__)

# The decoded images in float32 exist about three times at the end of a run: the VAE output, its clamped and
# permuted IMAGE form, and the caller's conversion to 8-bit (which is smaller, counted as a whole copy to be safe).
_IMAGE_COPIES = 3


class InsufficientMemoryError(ValueError):
    """The run would need more memory than the machine has; the message gives both and the ways to make it fit."""


@dataclass(frozen=True)
class StepNeed:
    """What one pipeline step adds to what the process already holds."""

    label: str  # e.g. "the base UNet step"
    weights: int  # bytes of networks read for this step
    activations: int  # bytes of working tensors

    @property
    def total(self) -> int:
        return self.weights + self.activations


@dataclass(frozen=True)
class MemoryEstimate:
    steps: tuple[StepNeed, ...]
    available: int | None  # None: this platform does not say
    where: str  # "system memory" or "GPU memory (cuda:0)"

    @property
    def peak(self) -> StepNeed:
        return max(self.steps, key=lambda step: step.total)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak.total <= self.available


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.0f} MB"


def available_memory(device: torch.device) -> int | None:
    """Bytes a run on `device` can still take: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return available_device_memory(device)
    return available_host_memory()


def available_host_memory() -> int | None:
    """The kernel's estimate of memory available without swapping, capped by this process's cgroup limit."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if available is None and hasattr(os, "sysconf"):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None  # this platform does not say (macOS, Windows): the estimate is then only logged
    limit = _cgroup_headroom()
    return min(available, limit) if limit is not None and available is not None else available


def _cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None without a limit."""
    try:
        relative = Path("/proc/self/cgroup").read_text().strip().split("\n")[0].split("::", 1)[1]
        group = Path("/sys/fs/cgroup") / relative.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def _unet_activation_bytes(model, batch: int, latent_hw: tuple[int, int]) -> int:
    # Both sides of guidance in one call (CFG batches positive and negative), in the compute precision.
    return 2 * batch * latent_hw[0] * latent_hw[1] * UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL * model.dtype.itemsize


def _weights(model, part: str) -> int:
    """Bytes a step reads: its networks that are not in memory yet (those that are, are already held)."""
    return sum(model.weight_bytes(name) for name in stage_components(model, part) if not model.is_resident(name))


def estimate_generation(base, refiner, width: int, height: int, batch: int, *, device: torch.device,
                        uses_refiner: bool, weights_on_host: bool = False) -> MemoryEstimate:
    """The memory each step of a text-to-image run adds, against what `device` has.

    `weights_on_host`: weights wait in system RAM and a residency plan moves them to the GPU (its own budget
    checks the GPU side), so the estimate is of system memory, weights only."""
    from ..config import VAE_DOWNSCALE

    latent = (height // VAE_DOWNSCALE, width // VAE_DOWNSCALE)
    size = f"{batch} image{'s' if batch > 1 else ''} of {width}x{height}"
    stages = [(base, "text", "the base's text encoders", 0),
              (base, "unet", f"the base UNet step ({size})", _unet_activation_bytes(base, batch, latent))]
    if uses_refiner:
        stages += [(refiner, "text", "the refiner's text encoder", 0),
                   (refiner, "unet", f"the refiner UNet step ({size})", _unet_activation_bytes(refiner, batch, latent))]
    vae_dtype = base.vae_dtype
    decode = (estimate_decode_bytes(base.config.vae, batch, height, width, vae_dtype)
              + _IMAGE_COPIES * batch * height * width * 3 * torch.float32.itemsize)
    stages.append((base, "vae", f"the VAE decode ({size})", decode))
    steps = tuple(StepNeed(label, _weights(model, part), 0 if weights_on_host else activations)
                  for model, part, label, activations in stages)
    host = device.type != "cuda" or weights_on_host
    where = "system memory" if host else f"GPU memory ({device})"
    return MemoryEstimate(steps, available_memory(torch.device("cpu") if host else device), where)


def check_fits(estimate: MemoryEstimate, *, options: list[str]) -> None:
    """Raise InsufficientMemoryError, in a sentence with both numbers and `options`, unless the run fits."""
    peak = estimate.peak
    if estimate.available is None:
        logger.info("this run needs about %s at its peak (%s); this platform does not report available memory",
                    _gb(peak.total), peak.label)
        return
    if estimate.fits:
        logger.info("memory: the run needs about %s at its peak (%s) of %s available", _gb(peak.total), peak.label,
                    _gb(estimate.available))
        return
    parts = (f"{_gb(peak.weights)} of weights + {_gb(peak.activations)} of activations" if peak.weights
             else f"{_gb(peak.activations)} of activations")
    ways = "; ".join(options) if options else "free memory (close other programs) or use a larger machine"
    raise InsufficientMemoryError(
        f"this run needs about {_gb(peak.total)} of {estimate.where} at its peak, {peak.label}: {parts}, but only "
        f"{_gb(estimate.available)} is available, so it was not started. To make it fit: {ways}")


def fitting_options(base, refiner, width: int, height: int, batch: int, *, device: torch.device,
                    uses_refiner: bool, weights_on_host: bool, storage_is_half: bool) -> list[str]:
    """What would make a refused run fit, each with the peak it would have, for the refusal's sentence."""
    options = []
    if batch > 1:
        smaller = estimate_generation(base, refiner, width, height, 1, device=device, uses_refiner=uses_refiner,
                                      weights_on_host=weights_on_host)
        options.append(f"one image at a time (batch size 1: {_gb(smaller.peak.total)})")
    if not storage_is_half:
        options.append("hold the weights in fp16 (--storage-dtype fp16, storage_dtype=torch.float16 in Python: "
                       "about half the weights' bytes)")
    side = max(width, height)
    if side > 1024:
        options.append(f"a smaller image (at most 1024 pixels a side is SDXL's native size; {width}x{height} "
                       "was asked)")
    if device.type == "cuda" and not weights_on_host:
        options.append("--low-vram (one network at a time on the GPU)")
    options.append("free memory (close other programs)")
    return options


def check_generation_fits(base, refiner, request, *, residency=None) -> MemoryEstimate:
    """Estimate a text-to-image request before any weight is read and refuse it, in a sentence, when it cannot
    fit. Returns the estimate (for logs and benchmarks)."""
    device = base.device
    on_host = residency is not None and residency.moves_weights
    uses_refiner = refiner is not None and request.refiner_start < request.steps
    args = (base, refiner, request.width, request.height, request.batch_size)
    estimate = estimate_generation(*args, device=device, uses_refiner=uses_refiner, weights_on_host=on_host)
    options = []
    if not estimate.fits:  # the options cost estimates of their own: only worked out for a refusal
        half = all(_held_in_half(model) for model in (base, refiner) if model is not None)
        options = fitting_options(*args, device=device, uses_refiner=uses_refiner, weights_on_host=on_host,
                                  storage_is_half=half)
    check_fits(estimate, options=options)
    return estimate


def _held_in_half(model) -> bool:
    """True when the UNet's weights are (or will be) held in two bytes or fewer each."""
    return model.weight_bytes("unet") <= 2 * model.weight_elements("unet")
