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
from .resize import center_crop_resize

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


# Inpainting UNets (the diffusers "SDXL inpainting 0.1" layout) read 9 channels: the noisy latent, then the mask and
# the latent of the masked image (ComfyUI `BaseModel.set_inpaint`: concat keys "mask", "masked_image").
INPAINT_UNET_CHANNELS = 9
# The SDXL latent of a mid-grey picture (pixels 0.5, which is "zero" in the VAE's [-1, 1] space), per channel,
# scaled: what an inpainting UNet sees as the masked image when no mask is given at all (ComfyUI's values).
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def _to_latent_grid(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize after a centre crop to the latent's aspect ratio (ComfyUI `common_upscale(..., "center")`)."""
    return center_crop_resize(tensor, height, width, "bilinear")


def _to_batch(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"the {what} has a batch of {tensor.shape[0]} for a latent batch of {batch}; give one, or one "
                     "per latent")


class InpaintConcat:
    """The extra input channels of an inpainting UNet, per conditioning entry (ComfyUI `BaseModel.concat_cond`):
    [mask (rounded), masked-image latent], from the entry's InpaintModelConditioning fields when it has them, else
    from the sampled latent and its noise mask; an all-ones mask and a blank image without either."""

    def __init__(self, latent: torch.Tensor, denoise_mask: torch.Tensor | None, latent_scale: float):
        self.latent = latent  # model scale, [B, 4, h, w]
        self.denoise_mask = denoise_mask  # prepare_denoise_mask's [B, 4, h, w], or None
        self.latent_scale = latent_scale

    def for_options(self, options: dict, where: str) -> torch.Tensor:
        batch, _, height, width = self.latent.shape
        image = options.get("concat_latent_image")
        if image is None:
            image = self.latent
        else:
            if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != self.latent.shape[1]:
                raise ValueError(f"{where}'s concat_latent_image must be a [batch, 4, h, w] latent")
            image = _to_latent_grid(image.to(self.latent) * self.latent_scale, height, width)
        image = _to_batch(image, batch, f"{where}'s inpainting image")
        mask = options.get("concat_mask", self.denoise_mask)
        if mask is None:
            blank = torch.tensor(BLANK_INPAINT_LATENT, dtype=self.latent.dtype, device=self.latent.device)
            return torch.cat([torch.ones_like(self.latent[:, :1]), blank.view(1, -1, 1, 1).expand_as(self.latent)],
                             dim=1)
        mask = mask.to(self.latent)
        if mask.ndim == 4:
            mask = mask[:, :1]
        mask = mask.reshape(-1, 1, *mask.shape[-2:])
        mask = _to_batch(_to_latent_grid(mask, height, width).round(), batch, f"{where}'s inpainting mask")
        return torch.cat([mask, image], dim=1)
