"""One loaded SDXL stage (base or refiner): its networks, tokenizer and where it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SDXLConfig
from ..text.encoders import TextEncoder
from ..text.tokenizer import SDXLTokenizer
from .unet import UNetModel
from .vae import AutoencoderKL


@dataclass
class SDXLModel:
    """The parts of one SDXL stage, as `load_checkpoint` returns them; `clip_l` is None for the refiner."""

    config: SDXLConfig
    unet: UNetModel
    vae: AutoencoderKL
    clip_g: TextEncoder
    clip_l: TextEncoder | None
    tokenizer: SDXLTokenizer
    source: Path | None  # the checkpoint file or diffusers folder, None for a model built in memory
    dtype: torch.dtype  # of the UNet and text encoders (the VAE may differ: `vae.dtype`)

    @property
    def kind(self) -> str:
        """ "base" or "refiner"."""
        return self.config.kind

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks by component name (no `clip_l` for the refiner)."""
        parts = {"unet": self.unet, "vae": self.vae, "clip_g": self.clip_g}
        if self.clip_l is not None:
            parts["clip_l"] = self.clip_l
        return parts

    def to(self, device: torch.device | str) -> SDXLModel:
        """Move every network to `device` (in place, like `nn.Module.to`) and return self."""
        for module in self.modules().values():
            module.to(device)
        return self

    def parameter_count(self) -> int:
        return sum(p.numel() for module in self.modules().values() for p in module.parameters())
