"""The bridge from this pack's loaded models to ComfyUI's own types: a MODEL, CLIP and VAE that share every weight
tensor with ours, so core KSampler, ControlNet, other packs' nodes and ComfyUI's model management work on them.

(The other way needs no node: the samplers, text encoders and VAE nodes take ComfyUI's MODEL / CLIP / VAE too.)
"""

from __future__ import annotations

from . import comfy_host
from ._shared import CATEGORY, SDXL_MODEL, SDXL_VAE, node_id


class ToComfy:
    """Hand our loaded SDXL stage to ComfyUI as its own MODEL, CLIP and VAE, on the same tensors."""

    SEARCH_ALIASES = ("to comfyui", "model clip vae", "convert model", "ksampler model")
    DESCRIPTION = ("Turns a model from 'Load SDXL Checkpoint' (or 'Load SDXL LoRA') into ComfyUI's own MODEL, CLIP "
                   "and VAE, for core KSampler, Apply ControlNet, CLIP Text Encode SDXL and other packs' nodes. "
                   "Nothing is copied: ComfyUI's objects use this model's weight tensors, and ComfyUI's memory "
                   "management moves and counts them as its own. The same objects come back every time for the "
                   "same model.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("ComfyUI's MODEL of this SDXL stage (ComfyUI's SDXL or SDXL refiner model).",
                       "ComfyUI's CLIP of this stage's text encoders (CLIP-L + bigG for the base, bigG for the "
                       "refiner).",
                       "ComfyUI's VAE: the vae input's, or the model's own.")
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SDXL_MODEL, {"tooltip": "The SDXL base or refiner from 'Load SDXL Checkpoint' or 'Load SDXL "
                                              "LoRA'."}),
        }, "optional": {
            "vae": (SDXL_VAE, {"tooltip": "A VAE to hand over instead of the model's own (e.g. from 'Load SDXL "
                                          "VAE'); leave unconnected for the model's."}),
        }}

    def convert(self, model, vae=None):
        from sdxl_core.models.bundle import SDXLModel

        if not isinstance(model, SDXLModel):
            raise ValueError(f"expected an SDXL model from 'Load SDXL Checkpoint', got {type(model).__name__}")
        return comfy_host.comfy_objects_from_core(model, vae, node="SDXL to ComfyUI")


NODE_CLASS_MAPPINGS = {node_id("ToComfy"): ToComfy}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("ToComfy"): "SDXL to ComfyUI (MODEL, CLIP, VAE)"}
