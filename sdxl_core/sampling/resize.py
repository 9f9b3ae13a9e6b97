"""Fitting an image-shaped tensor (a control image, an inpainting latent or mask) onto another grid, as ComfyUI's
`comfy.utils.common_upscale(..., crop="center")` does, so the same picture lands on the same cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def center_crop_resize(tensor: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """[..., h, w] -> [..., height, width]: cut the longer side's excess equally from both ends so the aspect ratio
    matches, then resize with `mode` (an `F.interpolate` mode). A tensor already of that size comes back as it is."""
    if tuple(tensor.shape[-2:]) == (height, width):
        return tensor
    old_h, old_w = tensor.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    top = left = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return F.interpolate(tensor[..., top:old_h - top, left:old_w - left], size=(height, width), mode=mode)
