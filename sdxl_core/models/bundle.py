"""One SDXL stage (base or refiner): its networks, tokenizer and where it came from.

A model either holds its networks (built in memory, or `load_checkpoint`: everything read up front) or is backed by
its checkpoint (`open_checkpoint`): then each network is read from the file the first time it is used and can be
released again, so a two-stage run holds one stage's networks at a time instead of both checkpoints whole
(sdxl_core/runtime/stages.py decides when).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import SDXLConfig
from ..text.encoders import TextEncoder
from ..text.tokenizer import SDXLTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "clip_g", "clip_l")



class ComponentReader(Protocol):
    """What `open_checkpoint` hands a model: builds and fills one network from the checkpoint by component name,
    and says, from the header alone, what it will weigh and where and in what it will compute."""

    device: torch.device  # where the networks it reads live
    vae_dtype: torch.dtype  # what the VAE it reads computes in

    def __call__(self, name: str) -> nn.Module: ...

    def weight_bytes(self, name: str) -> int: ...

    def weight_elements(self, name: str) -> int: ...


class SDXLModel:
    """The parts of one SDXL stage; `clip_l` is None for the refiner.

    With a `reader`, a network given as None is read on first access (`model.unet`, `model.component("unet")`) and
    `release(name)` drops it again; a network given explicitly, or changed with `replace`, is never re-read (the
    reader would bring back the file's weights, not the changed ones).
    """

    def __init__(self, config: SDXLConfig, unet: UNetModel | None = None, vae: AutoencoderKL | None = None,
                 clip_g: TextEncoder | None = None, clip_l: TextEncoder | None = None,
                 tokenizer: SDXLTokenizer | None = None, source: Path | None = None,
                 dtype: torch.dtype = torch.float32, *, reader: ComponentReader | None = None,
                 rereadable: frozenset[str] = frozenset(), rescale_cfg: float = 0.0):
        self.config = config
        # RescaleCFG's multiplier patched onto the model, as ComfyUI's RescaleCFG node patches its MODEL (0: plain
        # CFG); the sampler applies it (sampling/model_sampling.py `with_rescale_cfg`, sampling/ksampler.py).
        self.rescale_cfg = rescale_cfg
        self.tokenizer = tokenizer if tokenizer is not None else SDXLTokenizer()
        self.source = source  # the checkpoint file or diffusers folder, None for a model built in memory
        self.dtype = dtype  # what the UNet and text encoders compute in (the VAE may differ: `vae.dtype`)
        self._parts: dict[str, nn.Module | None] = {"unet": unet, "vae": vae, "clip_g": clip_g, "clip_l": clip_l}
        self._reader = reader
        # The components the reader can bring back exactly as they are: read by it and not replaced since.
        self._rereadable = set(rereadable) if reader is not None else set()
        if reader is not None:
            self._rereadable |= {name for name in self.component_names if self._parts[name] is None}

    def __repr__(self) -> str:
        held = ", ".join(self.resident_components()) or "nothing"
        return f"SDXLModel({self.kind}, source={self.source}, dtype={self.dtype}, holding {held})"

    @property
    def kind(self) -> str:
        """ "base" or "refiner"."""
        return self.config.kind

    @property
    def component_names(self) -> tuple[str, ...]:
        """The networks this stage has (no `clip_l` for the refiner)."""
        return tuple(name for name in COMPONENTS if name != "clip_l" or self.config.clip_l is not None)

    # ------------------------------------------------------------------------------------------------ components

    def component(self, name: str) -> nn.Module | None:
        """The network `name`, read from the checkpoint now if it is not in memory (None: `clip_l` of a refiner)."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}; expected one of {COMPONENTS}")
        if name not in self.component_names:
            return None
        module = self._parts[name]
        if module is None and self._reader is not None:
            logger.info("reading the %s %s from %s", self.kind, name, self.source)
            module = self._parts[name] = self._reader(name)
        return module

    @property
    def unet(self) -> UNetModel:
        return self.component("unet")

    @property
    def vae(self) -> AutoencoderKL:
        return self.component("vae")

    @property
    def clip_g(self) -> TextEncoder:
        return self.component("clip_g")

    @property
    def clip_l(self) -> TextEncoder | None:
        return self.component("clip_l")

    def is_resident(self, name: str) -> bool:
        """True when the network `name` is in memory now (reading nothing)."""
        return self._parts.get(name) is not None

    def resident_components(self) -> tuple[str, ...]:
        return tuple(name for name in self.component_names if self._parts[name] is not None)

    def weight_bytes(self, name: str) -> int:
        """Bytes the network `name` holds in memory, or will hold once read (from the checkpoint's header)."""
        module = self._parts.get(name)
        if module is not None:
            return sum(t.numel() * t.element_size() for t in _tensors(module))
        return self._reader.weight_bytes(name) if self._reader is not None else 0

    def weight_elements(self, name: str) -> int:
        """Elements of the network `name`'s tensors, in memory or in the checkpoint."""
        module = self._parts.get(name)
        if module is not None:
            return sum(t.numel() for t in _tensors(module))
        return self._reader.weight_elements(name) if self._reader is not None else 0

    @property
    def device(self) -> torch.device:
        """Where the UNet is, or will be once read."""
        if self.is_resident("unet"):
            return next(self.unet.parameters()).device
        return self._reader.device if self._reader is not None else torch.device("cpu")

    @property
    def vae_dtype(self) -> torch.dtype:
        """What the VAE computes in, or will once read."""
        if self.is_resident("vae") or self._reader is None:
            return self.vae.dtype
        return self._reader.vae_dtype

    def can_release(self, name: str) -> bool:
        """True when `name` can be dropped and read back unchanged from the checkpoint later."""
        return self._reader is not None and name in self._rereadable

    def release(self, name: str) -> None:
        """Drop the network `name` from memory; it is read from the checkpoint again when next used."""
        if not self.can_release(name):
            why = ("it was built in memory, not read from a checkpoint" if self._reader is None else
                   "it was changed after loading (e.g. a merged LoRA), and the file holds the unchanged weights")
            raise ValueError(f"the {self.kind} {name} cannot be released: {why}")
        self._parts[name] = None

    def replace(self, **networks: nn.Module) -> SDXLModel:
        """A new model sharing this one's networks and reader, with the given networks in their place (those are
        kept in memory for good: the reader cannot reproduce them)."""
        unknown = sorted(set(networks) - set(self.component_names))
        if unknown:
            raise ValueError(f"unknown components {unknown}; this {self.kind} has {self.component_names}")
        parts = {**self._parts, **networks}
        # Networks not in memory stay with the reader; the copy reads its own when it needs them.
        return SDXLModel(self.config, **parts, tokenizer=self.tokenizer, source=self.source, dtype=self.dtype,
                         reader=self._reader, rereadable=frozenset(self._rereadable - set(networks)),
                         rescale_cfg=self.rescale_cfg)

    def with_config(self, config, *, rescale_cfg: float | None = None) -> SDXLModel:
        """A new model sharing this one's networks and reader under another config of the same architecture (e.g. a
        prediction-type override, sampling/model_sampling.py `with_prediction`) and/or another RescaleCFG multiplier
        (None keeps this one's)."""
        return SDXLModel(config, **self._parts, tokenizer=self.tokenizer, source=self.source, dtype=self.dtype,
                         reader=self._reader, rereadable=self._rereadable,
                         rescale_cfg=self.rescale_cfg if rescale_cfg is None else rescale_cfg)

    def modules(self) -> dict[str, nn.Module]:
        """The networks by component name (no `clip_l` for the refiner); reads any that are not in memory."""
        return {name: self.component(name) for name in self.component_names}

    def to(self, device: torch.device | str) -> SDXLModel:
        """Move every network to `device` (in place, like `nn.Module.to`) and return self."""
        for module in self.modules().values():
            module.to(device)
        return self

    def parameter_count(self) -> int:
        return sum(p.numel() for module in self.modules().values() for p in module.parameters())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and persistent buffer once (tied weights counted once): what a checkpoint holds, without
    the small buffers a network builds for itself (e.g. CLIP's position ids)."""
    found = {id(p): p for p in module.parameters()}
    for owner in module.modules():
        for name, buffer in owner.named_buffers(recurse=False):
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                found[id(buffer)] = buffer
    return list(found.values())
