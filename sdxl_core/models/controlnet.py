"""The SDXL ControlNet: a copy of the UNet's encoder that turns a control image into residuals for the UNet.

Zhang, Rao & Agrawala (2023), "Adding Conditional Control to Text-to-Image Diffusion Models". Module and parameter
names follow the original single-file layout (sgm/ComfyUI `cldm.ControlNet`): `time_embed`, `label_emb`,
`input_blocks`, `middle_block` exactly as in the UNet, plus `input_hint_block` (the control-image encoder),
`zero_convs.N.0` (one 1x1 convolution per input block) and `middle_block_out.0`. diffusers-layout files are renamed to
these names by `sdxl_core.checkpoints.controlnet`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..config import ControlNetConfig
from .timestep_embedding import timestep_embedding
from .unet import ControlResiduals, build_encoder


def _hint_encoder(config: ControlNetConfig, **factory) -> nn.Sequential:
    """conv-SiLU stages from the control image to the UNet's first width, 8x smaller (sgm `input_hint_block`:
    the convolutions sit at the even indices 0, 2, ..., the SiLUs between them)."""
    widths = config.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, widths[0], 3, padding=1, **factory), nn.SiLU()]
    for cin, cout in zip(widths, widths[1:]):
        layers += [nn.Conv2d(cin, cin, 3, padding=1, **factory), nn.SiLU(),
                   nn.Conv2d(cin, cout, 3, padding=1, stride=2, **factory), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], config.unet.model_channels, 3, padding=1, **factory))
    return nn.Sequential(*layers)


class ControlNetModel(nn.Module):
    """x, timesteps, context, y and a control image -> the UNet's `ControlResiduals` (skips and middle)."""

    def __init__(self, config: ControlNetConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        factory = {"dtype": dtype, "device": device}
        self.time_embed, self.label_emb, self.input_blocks, self.middle_block, skip_channels = \
            build_encoder(config.unet, **factory)
        self.input_hint_block = _hint_encoder(config, **factory)
        # Single-layer Sequentials so that the checkpoint's `zero_convs.N.0.weight` names load as they are.
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(ch, ch, 1, **factory)) for ch in skip_channels)
        width = skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1, **factory))

    @classmethod
    def from_state_dict(cls, config: ControlNetConfig, state_dict: Mapping[str, torch.Tensor],
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> ControlNetModel:
        """Build on the meta device and adopt the original-layout tensors (strict: every name and shape)."""
        model = cls(config, device="meta")
        tensors = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                   for name, t in state_dict.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.requires_grad_(False).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                hint: torch.Tensor) -> ControlResiduals:
        """Residuals for the UNet call with the same `x`, `timesteps`, `context` and `y`, steered by `hint`
        ([B or 1, 3, 8h, 8w] in 0..1 for a [B, 4, h, w] `x`). They come back unscaled and in the network's dtype."""
        if self.middle_block_out[0].weight.is_meta:
            raise RuntimeError("the ControlNet was built on the meta device and has no weights yet: load it with "
                               "sdxl_core.checkpoints.controlnet.load_controlnet")
        cfg = self.config
        scale = cfg.hint_downscale
        expected = (x.shape[-2] * scale, x.shape[-1] * scale)
        if hint.ndim != 4 or hint.shape[1] != cfg.hint_channels or tuple(hint.shape[-2:]) != expected:
            raise ValueError(f"the control image must be [batch, {cfg.hint_channels}, {expected[0]}, {expected[1]}] "
                             f"for latents {tuple(x.shape)}, got {tuple(hint.shape)}")
        if hint.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"the control image batch is {hint.shape[0]}; expected 1 or the latent batch "
                             f"{x.shape[0]}")
        dtype = self.dtype
        context = context.to(dtype)
        t_emb = timestep_embedding(timesteps.to(x.device), cfg.unet.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(dtype))
        # The encoded hint joins after the first block (the input convolution), as in sgm and diffusers.
        guided_hint = self.input_hint_block(hint.to(device=x.device, dtype=dtype))

        h = x.to(dtype)
        skips = []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided_hint
            skips.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        return ControlResiduals(skips=tuple(skips), middle=self.middle_block_out(h))
