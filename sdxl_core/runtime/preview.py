"""Cheap RGB previews of SDXL latents: a per-channel linear map instead of a VAE decode ("Latent2RGB").

The factors are a least-squares fit from the four SDXL latent channels (in the diffusion model's scaled space,
i.e. VAE latents × 0.13025) to RGB in [-1, 1]. The numbers are those ComfyUI ships for SDXL
(Comfy-Org/ComfyUI `comfy/latent_formats.py`, class `SDXL`, `latent_rgb_factors` / `latent_rgb_factors_bias`).
"""

from __future__ import annotations

import torch

# Rows: latent channels 0..3; columns: R, G, B.
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """One scaled SDXL latent [4, h, w] -> a uint8 RGB preview [h, w, 3] on the CPU (ComfyUI Latent2RGB)."""
    if latent.ndim != 3 or latent.shape[0] != len(SDXL_LATENT_RGB_FACTORS):
        raise ValueError(f"expected one SDXL latent of shape [4, height, width], got {tuple(latent.shape)}")
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = latent.detach().float().cpu().movedim(0, -1) @ factors + bias
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).to(torch.uint8)
