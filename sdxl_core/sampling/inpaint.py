"""Inpainting with a LATENT's `noise_mask`, as ComfyUI's KSampler runs it (`samplers.KSamplerX0Inpaint`).

The mask (1 = repaint, 0 = keep; SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning) is resized to
the latent with bilinear interpolation and spread over the latent channels (`sampler_helpers.prepare_mask`). Around
every model call the kept region is replaced by the original latent noised to the current sigma with the run's own
noise, and the model's x0 there by the original latent itself; the repainted region is sampled as usual. With the
last sigma 0, the kept region therefore ends exactly on the original latent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .denoiser import broadcastable_sigma, per_item_sigma

NOISE_MASK = "noise_mask"
Denoiser = Callable[..., torch.Tensor]


def prepare_denoise_mask(noise_mask: torch.Tensor, latent_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A MASK ([H, W], [B, H, W] or [B, 1, H, W], any resolution) as a float32 [B, C, h, w] mask over the latents.

    Refused with a sentence: a mask that is not 2-4 dimensional, non-finite, or whose batch is neither 1 nor the
    latent batch (ComfyUI would silently cycle or cut it)."""
    if not isinstance(noise_mask, torch.Tensor) or not 2 <= noise_mask.ndim <= 4 or (
            noise_mask.ndim == 4 and noise_mask.shape[1] != 1):
        shape = tuple(noise_mask.shape) if isinstance(noise_mask, torch.Tensor) else type(noise_mask).__name__
        raise ValueError(f"the latent's noise_mask must be a MASK [height, width] or [batch, height, width], got "
                         f"{shape}")
    batch, channels, height, width = latent_shape
    mask = noise_mask.float().reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"the inpainting mask has {mask.shape[0]} images but the latent batch has {batch}; give one "
                         "mask for the whole batch or one per latent")
    if not torch.isfinite(mask).all():
        raise ValueError("the inpainting mask contains NaN or infinite values")
    mask = F.interpolate(mask, size=(height, width), mode="bilinear")
    return mask.expand(batch, channels, height, width).contiguous()


def noise_mask_for_image(mask: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """A MASK for an image of `image_hw` pixels as a LATENT's noise_mask [B, 1, H, W] (ComfyUI SetLatentNoiseMask);
    a mask of another size is refused rather than stretched."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"the inpainting mask must be a MASK [height, width] or [batch, height, width], got {shape}")
    if tuple(mask.shape[-2:]) != tuple(image_hw):
        raise ValueError(f"the inpainting mask is {mask.shape[-1]}x{mask.shape[-2]} pixels but the image is "
                         f"{image_hw[1]}x{image_hw[0]}; give a mask of the image's size (white repaints, black keeps)")
    return mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])


class InpaintingDenoiser:
    """Wraps a denoiser `(x, sigma, **kw) -> x0` so that only the masked region is denoised (ComfyUI
    `KSamplerX0Inpaint` without a `denoise_mask_function`).

    `latent` is the original latent in model scale, `noise` the run's unscaled noise (zeros without add_noise, as
    ComfyUI passes them), `mask` from `prepare_denoise_mask`."""

    def __init__(self, denoiser: Denoiser, latent: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor):
        if not latent.shape == noise.shape == mask.shape:
            raise ValueError(f"latent {tuple(latent.shape)}, noise {tuple(noise.shape)} and mask "
                             f"{tuple(mask.shape)} must have one shape")
        self.denoiser = denoiser
        self.latent = latent
        self.noise = noise
        self.mask = mask.to(device=latent.device, dtype=latent.dtype)
        self.keep = 1.0 - self.mask

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        sigma_b = broadcastable_sigma(per_item_sigma(sigma, x), x.ndim)
        noised_original = self.noise * sigma_b + self.latent
        x = x * self.mask + noised_original * self.keep
        x0 = self.denoiser(x, sigma, **kwargs)
        return x0 * self.mask + self.latent * self.keep
