"""The empty-latent node: pick one of the paper's aspect buckets, or a free size."""

from __future__ import annotations

from sdxl_core.buckets import DEFAULT_BUCKET, SDXL_BUCKETS, bucket_by_label

from . import comfy_host
from ._shared import CATEGORY, LATENT_CELL, MAX_RESOLUTION, check_widgets, node_id

CUSTOM = "custom"
BUCKET_CHOICES = [CUSTOM] + [bucket.label for bucket in SDXL_BUCKETS]
MAX_BATCH = 4096


def _check(resolution: str | None, width: int | None, height: int | None, batch_size: int | None) -> None:
    check_widgets(EmptyLatent, resolution=resolution, width=width, height=height, batch_size=batch_size)
    if resolution == CUSTOM or resolution is None:
        for name, value in (("width", width), ("height", height)):
            if value is not None and value % LATENT_CELL:
                raise ValueError(f"{name} must be a multiple of {LATENT_CELL} pixels (one latent cell), got {value}; "
                                 f"the nearest are {value // LATENT_CELL * LATENT_CELL} and "
                                 f"{(value // LATENT_CELL + 1) * LATENT_CELL}")


class EmptyLatent:
    """An empty SDXL latent at one of the 40 training buckets (about one megapixel each) or at a free size."""

    SEARCH_ALIASES = ('empty latent image', 'resolution', 'aspect ratio', 'bucket')
    DESCRIPTION = ("Makes the empty latent a text-to-image run starts from. SDXL was trained on 40 aspect buckets "
                   "of about one megapixel (SDXL paper, appendix I); picking one of them gives the best "
                   "composition at that aspect ratio. Choose 'custom' to type any size (multiples of 8). The width "
                   "and height outputs carry the size on to micro-conditioning.")
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    OUTPUT_TOOLTIPS = ("An all-zero LATENT (ComfyUI's format; works with core samplers too).",
                       "The image width in pixels.", "The image height in pixels.")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "resolution": (BUCKET_CHOICES, {"default": DEFAULT_BUCKET.label,
                                            "tooltip": "One of SDXL's training buckets (width x height and aspect "
                                                       "ratio), or 'custom' to use the width and height below. "
                                                       "With a bucket chosen, width and height follow it."}),
            "width": ("INT", {"default": DEFAULT_BUCKET.width, "min": 64, "max": MAX_RESOLUTION, "step": LATENT_CELL,
                              "tooltip": "Image width in pixels, a multiple of 8; used when resolution is 'custom'. "
                                         "Far from one megapixel SDXL composes worse (duplicated subjects above, "
                                         "mush below)."}),
            "height": ("INT", {"default": DEFAULT_BUCKET.height, "min": 64, "max": MAX_RESOLUTION,
                               "step": LATENT_CELL,
                               "tooltip": "Image height in pixels, a multiple of 8; used when resolution is "
                                          "'custom'."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH,
                                   "tooltip": "How many images to generate at once (each gets its own noise)."}),
        }}

    # No VALIDATE_INPUTS: ComfyUI would repeat a width sentence on all four inputs; generate() checks first.

    def generate(self, resolution: str, width: int, height: int, batch_size: int = 1):
        from sdxl_core.pipeline import empty_latent

        _check(resolution, width, height, batch_size)
        if resolution != CUSTOM:
            bucket = bucket_by_label(resolution)
            width, height = bucket.width, bucket.height
        latent = empty_latent(width, height, batch_size)
        return ({"samples": latent["samples"].to(comfy_host.output_device())}, width, height)


NODE_CLASS_MAPPINGS = {node_id("EmptyLatent"): EmptyLatent}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("EmptyLatent"): "SDXL Empty Latent (aspect buckets)"}
