"""Sinusoidal timestep embedding shared by the UNet (diffusion time) and the micro-conditioning (ADM) vector."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding, cos half first (sgm `diffusionmodules/util.py timestep_embedding`).

    `t` is a 1-D tensor of N (possibly fractional) timesteps or scalars; the result is float32 [N, dim],
    independent of `t`'s dtype, because sgm keeps the sinusoid in fp32 and the ADM scalars (sizes up to 4096)
    would lose whole units in fp16.
    """
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects a 1-D tensor of N values, got shape {tuple(t.shape)}")
    if dim <= 0 or dim % 2:
        # sgm zero-pads odd widths; SDXL only uses even ones (model_channels, 256), so an odd width is a bug upstream.
        raise ValueError(f"timestep_embedding needs a positive even dim, got {dim}")
    half = dim // 2
    # Same float ops in the same order as sgm and diffusers' get_timestep_embedding, so the results are bit-equal.
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
