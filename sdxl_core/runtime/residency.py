"""Which weights sit on the GPU when: SDXL base + refiner + VAE on a GPU with 8 GB.

Base and refiner together hold about 9.7 GB of fp16 UNet weights, their text encoders 3 GB more
(docs/performance.md#memory): an 8 GB card cannot keep them all. The plan keeps every stage's weights on the offload
device (the CPU) and, for each step of the pipeline, moves to the GPU only what that step needs, evicting the least
recently used modules until the weights fit a byte budget:

    text encoding  clip_l + clip_g of the stage        (offloaded again as soon as a UNet needs the room)
    denoising      that stage's UNet                    (one UNet at a time: 4.8 GiB base, 4.2 GiB refiner, fp16)
    decoding       the VAE                              (0.16 GiB; the decode itself may tile, vae_decoding.py)

Weights are treated as read-only: the plan keeps one host copy of every tensor (pinned on request, for faster
uploads) and "offloading" just points the parameters back at it, so eviction copies nothing back. The budget counts
weights only; activations need the rest of the card (`DEFAULT_ACTIVATION_RESERVE`, sized for a 1024x1024 decode).

On a CPU-only machine (device == offload device) nothing moves, but the plan still tracks what would be resident,
enforces the budget and logs every load and eviction, so the policy is testable without a GPU.

Use it around the pipeline's stages (`generate(..., residency=plan)` does this once the pipeline takes it)::

    plan = ResidencyPlan.for_device_memory("cuda", 8 * GiB)
    with plan.stage(base, "text"):
        positive = encode_base_conditioning(base, prompt)
    with plan.stage(base, "unet"):
        latent = sample_latent(base, latent, positive, negative, ...)
    with plan.stage(base, "vae"):
        images = decode(base, latent)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

GiB = 2**30
# Device memory left to activations and the allocator. The largest user is the 1024x1024 VAE decode: 1.3 GB of
# live tensors in bf16 (vae_decoding.py measures 640 elements per pixel), which vae_decoding budgets at 2.5 GiB with
# allocator headroom (and tiles if it still runs out); the base UNet's CFG batch at 1024x1024 needs well under 1 GiB
# with fused attention. 2.5 GiB leaves an 8 GiB card a 5.5 GiB weight budget (a real 8 GB card, ~7.5 GiB usable
# after the CUDA context, 5 GiB): one fp16 UNet (4.8 GiB base) fits, a UNet plus the 1.5 GiB text encoders does
# not, so they are evicted before it arrives.
DEFAULT_ACTIVATION_RESERVE = int(2.5 * GiB)

# Activation memory of one UNet pass, in elements per latent cell of each sample in the batch (a guided step runs
# positive and negative as two). Measured as the peak of live tensors with `benchmarks/activation_memory.py` (fake
# tensors, full-size configs, 1024x1024, fused attention): base 5.4k, refiner 6.4k elements per cell. 8192 leaves
# 1.5x / 1.3x for the caching allocator and cuDNN workspaces: 256 MiB per half-precision 1024x1024 sample, what
# ComfyUI itself asks for an SDXL UNet (262 MiB).
UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL = 8192


def unet_activation_bytes(unet: nn.Module, batch: int, latent_height: int, latent_width: int) -> int:
    """Device memory one UNet call on a [batch, 4, latent_height, latent_width] input needs next to its weights."""
    from ..operations import compute_dtype_of

    itemsize = compute_dtype_of(unet).itemsize  # activations are in the compute dtype, not the weights' storage
    return batch * latent_height * latent_width * UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL * itemsize

# The pipeline steps a plan knows, and which components of an SDXLModel each one needs.
STAGE_PARTS: dict[str, tuple[str, ...]] = {
    "text": ("clip_l", "clip_g"),  # the refiner has no clip_l; only the components the model has are used
    "unet": ("unet",),
    "vae": ("vae",),
}


class ResidencyError(RuntimeError):
    """A stage's weights cannot be made resident within the plan's budget."""


@dataclass(frozen=True)
class ResidencyEvent:
    action: str  # "load" or "offload"
    name: str
    bytes: int
    resident_bytes: int  # after the action


def _tensor_slots(module: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """(owner, attribute name, is_parameter, tensor) for every parameter and buffer, each tensor once."""
    seen: set[int] = set()
    slots = []
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                slots.append((owner, name, True, param))
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                slots.append((owner, name, False, buffer))
    return slots


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Managed:
    """One module under the plan: its host copies, size and bookkeeping."""

    def __init__(self, name: str, module: nn.Module, offload_device: torch.device, pin_memory: bool,
                 moves_weights: bool):
        self.name = name
        self.module = module
        slots = _tensor_slots(module)
        if any(t.is_meta for *_, t in slots):
            raise ResidencyError(f"{name} still has meta (unloaded) weights; load its checkpoint before planning")
        self.bytes = sum(_nbytes(t) for *_, t in slots)
        self.layout = [(id(owner), attr, tuple(t.shape)) for owner, attr, _, t in slots]
        self.host: list[torch.Tensor] = []
        if moves_weights:
            for owner, attr, is_param, tensor in slots:
                tensor = tensor.detach()
                if pin_memory and not (tensor.device == offload_device and tensor.is_pinned()):
                    # Straight into page-locked memory: uploads from it run at full bus speed, asynchronously.
                    host = torch.empty_like(tensor, device=offload_device, pin_memory=True).copy_(tensor)
                else:
                    host = tensor.to(offload_device)
                self.host.append(host)
                _assign(owner, attr, is_param, host)
        self.resident = False
        self.in_use = 0
        self.last_used = 0

    def check_unchanged(self) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
        slots = _tensor_slots(self.module)
        if [(id(owner), attr, tuple(t.shape)) for owner, attr, _, t in slots] != self.layout:
            raise ResidencyError(f"{self.name} changed its parameters since it was put under the residency plan "
                                 "(e.g. fuse_qkv after planning); apply such changes first, then plan")
        return slots


def _assign(owner: nn.Module, attr: str, is_param: bool, tensor: torch.Tensor) -> None:
    if is_param:
        getattr(owner, attr).data = tensor  # same Parameter object: optimisers, hooks and compiled guards keep it
    else:
        setattr(owner, attr, tensor)  # a registered buffer name assigns into module._buffers


class ResidencyPlan:
    """Move one pipeline stage's weights at a time onto `device`, within `budget_bytes` of resident weights.

    `budget_bytes=None` sets no limit (modules then stay resident once loaded). See the module docstring.
    """

    def __init__(self, device: torch.device | str, budget_bytes: int | None = None, *,
                 offload_device: torch.device | str = "cpu", pin_memory: bool = False,
                 release_cached_memory: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.offload_device = torch.device(offload_device)
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive (or None for no limit), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory and self.device.type == "cuda"
        self.release_cached_memory = release_cached_memory
        self.events: list[ResidencyEvent] = []
        self.peak_resident_bytes = 0
        self._managed: dict[int, _Managed] = {}
        self._clock = itertools.count(1)

    @classmethod
    def for_device_memory(cls, device: torch.device | str, memory_bytes: int, *,
                          reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE, **kwargs) -> ResidencyPlan:
        """A plan for a card with `memory_bytes` usable: weights may take all but `reserve_bytes` of it."""
        budget = memory_bytes - reserve_bytes
        if budget <= 0:
            raise ValueError(f"{memory_bytes / GiB:.2f} GiB of device memory leaves nothing for weights after the "
                             f"{reserve_bytes / GiB:.2f} GiB activation reserve")
        return cls(device, budget, **kwargs)

    @classmethod
    def for_card(cls, device: torch.device | str = "cuda", *, reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE,
                 **kwargs) -> ResidencyPlan:
        """A plan sized from the GPU's total memory (what a `--low-vram` switch would use)."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"for_card sizes a plan from a CUDA device's memory; got {device} (use "
                             "for_device_memory with an explicit size elsewhere)")
        total = torch.cuda.get_device_properties(device).total_memory
        return cls.for_device_memory(device, total, reserve_bytes=reserve_bytes, **kwargs)

    # ------------------------------------------------------------------------------------------------ state

    @property
    def moves_weights(self) -> bool:
        """False when compute and offload device are the same (CPU-only): the plan then only keeps the books."""
        return self.device != self.offload_device

    @property
    def resident(self) -> tuple[str, ...]:
        return tuple(m.name for m in self._managed.values() if m.resident)

    @property
    def resident_bytes(self) -> int:
        return sum(m.bytes for m in self._managed.values() if m.resident)

    def summary(self) -> dict:
        return {
            "device": str(self.device), "moves_weights": self.moves_weights, "budget_bytes": self.budget_bytes,
            "peak_resident_bytes": self.peak_resident_bytes, "resident": list(self.resident),
            "loads": sum(e.action == "load" for e in self.events),
            "offloads": sum(e.action == "offload" for e in self.events),
            "managed": {m.name: m.bytes for m in self._managed.values()},
        }

    # ------------------------------------------------------------------------------------------------ stages

    def stage(self, model, part: str) -> contextlib.AbstractContextManager:
        """Make `part` ("text", "unet" or "vae") of an SDXLModel resident for the duration of the block."""
        if part not in STAGE_PARTS:
            raise ValueError(f"unknown stage part {part!r}; expected one of {sorted(STAGE_PARTS)}")
        # Only this part's networks: a checkpoint-backed model reads nothing else (sdxl_core/runtime/stages.py).
        wanted = {f"{model.kind}.{name}": model.component(name) for name in STAGE_PARTS[part]
                  if name in model.component_names}
        return self.use(wanted)

    @contextlib.contextmanager
    def use(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """Make the named modules resident for the duration of the block (the general form of `stage`)."""
        entries = [self._manage(name, module) for name, module in modules.items()]
        self._make_resident(entries)
        for entry in entries:
            entry.in_use += 1
        try:
            yield
        finally:
            stamp = next(self._clock)
            for entry in entries:
                entry.in_use -= 1
                entry.last_used = stamp

    def register(self, modules: Mapping[str, nn.Module]) -> None:
        """Put modules under the plan now, without loading them: their weights go to the offload device (so a
        memory cap set afterwards does not count them)."""
        for name, module in modules.items():
            entry = self._manage(name, module)
            if entry.resident and not entry.in_use:
                self._offload(entry)

    def register_model(self, model) -> None:
        """`register` every component of an SDXLModel, named like `stage` names them."""
        self.register({f"{model.kind}.{name}": module for name, module in model.modules().items()})

    def offload_all(self) -> None:
        """Evict everything that is not in use (e.g. before handing the GPU to another program)."""
        for entry in list(self._managed.values()):
            if entry.resident and not entry.in_use:
                self._offload(entry)
        self._release_cache()

    def release(self, module: nn.Module) -> None:
        """Stop managing `module`, leaving it on the offload device (its weights become writable again)."""
        entry = self._managed.pop(id(module), None)
        if entry is None:
            return
        if entry.in_use:
            self._managed[id(module)] = entry
            raise ResidencyError(f"{entry.name} is in use by an active stage and cannot be released")
        if entry.resident:
            self._offload(entry)

    # ------------------------------------------------------------------------------------------------ mechanics

    def _manage(self, name: str, module: nn.Module) -> _Managed:
        entry = self._managed.get(id(module))
        if entry is None:
            entry = _Managed(name, module, self.offload_device, self.pin_memory, self.moves_weights)
            self._managed[id(module)] = entry
        return entry

    def _make_resident(self, entries: list[_Managed]) -> None:
        missing = [e for e in entries if not e.resident]
        if not missing:
            return
        if self.budget_bytes is not None:
            needed = sum(e.bytes for e in entries)
            if needed > self.budget_bytes:
                names = ", ".join(f"{e.name} {e.bytes / GiB:.2f} GiB" for e in entries)
                raise ResidencyError(f"this stage needs {needed / GiB:.2f} GiB of weights ({names}) but the plan's "
                                     f"budget is {self.budget_bytes / GiB:.2f} GiB; use fp16/bf16 weights or a "
                                     "larger budget (a smaller activation reserve)")
            incoming = sum(e.bytes for e in missing)
            wanted = {id(e) for e in entries}
            evictable = sorted((e for e in self._managed.values()
                                if e.resident and not e.in_use and id(e) not in wanted), key=lambda e: e.last_used)
            evicted = False
            while self.resident_bytes + incoming > self.budget_bytes:
                if not evictable:
                    busy = [e.name for e in self._managed.values() if e.resident and e.in_use]
                    raise ResidencyError(
                        f"cannot fit {incoming / GiB:.2f} GiB more weights: {self.resident_bytes / GiB:.2f} GiB are "
                        f"resident and in use by enclosing stages ({', '.join(busy)}); budget "
                        f"{self.budget_bytes / GiB:.2f} GiB")
                self._offload(evictable.pop(0))
                evicted = True
            if evicted:
                self._release_cache()
        for entry in missing:
            self._load(entry)

    def _load(self, entry: _Managed) -> None:
        slots = entry.check_unchanged()
        if self.moves_weights:
            for (owner, attr, is_param, _), host in zip(slots, entry.host):
                _assign(owner, attr, is_param, host.to(self.device, non_blocking=host.is_pinned()))
        entry.resident = True
        self._record("load", entry)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _offload(self, entry: _Managed) -> None:
        slots = entry.check_unchanged()
        if self.moves_weights:
            for (owner, attr, is_param, _), host in zip(slots, entry.host):
                _assign(owner, attr, is_param, host)
        entry.resident = False
        self._record("offload", entry)

    def _record(self, action: str, entry: _Managed) -> None:
        event = ResidencyEvent(action, entry.name, entry.bytes, self.resident_bytes)
        self.events.append(event)
        logger.debug("residency: %s %s (%.2f GiB); %.2f GiB resident", action, entry.name, entry.bytes / GiB,
                     event.resident_bytes / GiB)

    def _release_cache(self) -> None:
        # Evicted weights go back to the caching allocator; on a small card hand the blocks back to the driver so
        # the next stage's differently sized tensors and the decode are not starved by fragmentation.
        if self.moves_weights and self.release_cached_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()


def no_residency(model, part: str) -> contextlib.AbstractContextManager:
    """The stage context of "no plan": everything stays where it is (for `residency=None` in the pipeline)."""
    if part not in STAGE_PARTS:
        raise ValueError(f"unknown stage part {part!r}; expected one of {sorted(STAGE_PARTS)}")
    return contextlib.nullcontext()
