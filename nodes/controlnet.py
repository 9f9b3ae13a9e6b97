"""ControlNet nodes: an SDXL ControlNet from ComfyUI's `controlnet` folder, and Apply ControlNet, which puts it on a
positive/negative CONDITIONING pair for this pack's samplers (the math is sdxl_core.sampling.control's).

ComfyUI's own ControlNet loader gives ComfyUI's CONTROL_NET objects, which run inside ComfyUI's sampler (and in this
pack's samplers too, driven through nodes/comfy_host/); these nodes are their counterpart read by this pack's SDXL
core, with the widgets of ComfyUI's Apply ControlNet (Advanced). The
entries they write carry an `sdxl_core` ControlNetApplication under ComfyUI's own "control" option, chained to any
ControlNet applied before, which the SDXL Base Sampler runs at every step inside its range (docs/comfyui.md).
"""

from __future__ import annotations

from . import comfy_host
from ._shared import (
    CATEGORY,
    SDXL_CONTROL_NET,
    SDXL_VAE,
    WEIGHT_DTYPES,
    check_widgets,
    node_id,
    validate_widgets,
    weight_dtypes,
)

# ComfyUI's Apply ControlNet (Advanced) widgets, so a graph's numbers mean the same in both.
_STRENGTH = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.001}


class ControlNetLoader:
    """Load an SDXL ControlNet (diffusers or original single-file layout) from ComfyUI's controlnet folder."""

    DESCRIPTION = ("Loads an SDXL ControlNet (.safetensors from models/controlnet) with this pack's SDXL core: the "
                   "diffusers layout (e.g. diffusers_xl_canny_full, controlnet-canny-sdxl-1.0) or the original "
                   "single-file layout. The file is checked before any weight is read: ControlNets for SD 1.x/2.x, "
                   "control-LoRAs, T2I adapters, multi-condition (union) ControlNets and non-ControlNet files are "
                   "refused with a message. Connect it to 'SDXL Apply ControlNet'.")
    CATEGORY = f"{CATEGORY}/loaders"
    SEARCH_ALIASES = ("load controlnet", "controlnet loader", "canny", "depth")
    RETURN_TYPES = (SDXL_CONTROL_NET,)
    RETURN_NAMES = ("control_net",)
    OUTPUT_TOOLTIPS = ("The SDXL ControlNet, for 'SDXL Apply ControlNet' (it steers the SDXL base).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "control_net_name": (comfy_host.model_filenames("controlnet"), {
                "tooltip": "SDXL ControlNet file from models/controlnet (canny, depth, openpose, ... for SDXL). "
                           "What kind of file it is is read from its tensors, not its name."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {
                "default": "default",
                "tooltip": "Precision of the ControlNet's weights once loaded. 'default' uses the UNet's precision "
                           "for your device (fp16 on most GPUs, fp32 on the CPU); fp32 is the safe, slow choice."}),
        }}

    def load(self, control_net_name: str, weight_dtype: str = "default"):
        from sdxl_core.checkpoints.controlnet import load_controlnet

        path = comfy_host.model_path("controlnet", control_net_name)
        # Loaded onto the offload device; the samplers move it onto the GPU next to the UNet, through ComfyUI's
        # model management, right before they sample (ComfyUI's own output cache keeps it between runs).
        return (load_controlnet(path, dtype=weight_dtypes(weight_dtype)[0], device=comfy_host.storage_device()),)


class ApplyControlNet:
    """Put an SDXL ControlNet with its control image on a positive/negative conditioning pair."""

    DESCRIPTION = ("Steers the SDXL base with a ControlNet and a control image (an edge map for canny, a depth map "
                   "for depth, ...), as ComfyUI's Apply ControlNet (Advanced): every entry of positive and "
                   "negative gets the ControlNet, and the SDXL Base Sampler runs it at each step between "
                   "start_percent and end_percent, its residuals times strength. Chain several Apply nodes to "
                   "combine ControlNets. The control image is centre-cropped to the latent's aspect ratio and "
                   "resized to its pixel size. SDXL ControlNets steer the base only: keep the refiner's "
                   "conditioning free of them.")
    CATEGORY = f"{CATEGORY}/conditioning"
    SEARCH_ALIASES = ("apply controlnet", "controlnet apply advanced", "control image", "canny")
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The positive conditioning with the ControlNet on each entry, for the SDXL Base Sampler.",
                       "The negative conditioning with the same ControlNet, for the SDXL Base Sampler.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "The base's positive conditioning (from 'SDXL Base Text "
                                                     "Encode', micro-conditioning or another Apply ControlNet)."}),
            "negative": ("CONDITIONING", {"tooltip": "The base's negative conditioning; it gets the ControlNet "
                                                     "too, as in ComfyUI's Apply ControlNet (Advanced)."}),
            "control_net": (SDXL_CONTROL_NET, {"tooltip": "The ControlNet from 'Load SDXL ControlNet'."}),
            "image": ("IMAGE", {"tooltip": "The control image, already preprocessed for this ControlNet (e.g. "
                                           "ComfyUI's Canny node for a canny ControlNet). Any size: it is "
                                           "centre-cropped to the latent's aspect ratio and resized."}),
            "strength": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the ControlNet steers: its residuals are "
                                   "multiplied by this (1 as trained, 0 applies nothing)."}),
            "start_percent": ("FLOAT", {"default": 0.0, **_PERCENT, "tooltip": "Where in the schedule the "
                                        "ControlNet starts to act, as a fraction of the model's noise schedule (0 "
                                        "= the first, noisiest step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, **_PERCENT, "tooltip": "Where it stops acting (1 = to the "
                                      "end). Stopping early (0.5-0.8) keeps the layout but frees the details."}),
        }, "optional": {
            "vae": (SDXL_VAE, {"tooltip": "Not needed: SDXL ControlNets read the control image's pixels, so the "
                               "VAE is not used (ComfyUI's Apply ControlNet ignores it for them too). Accepted so "
                               "a graph wired like ComfyUI's keeps its link."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, strength=None):
        # One input per check, so ComfyUI reports a sentence once, on its input; non-finite percentages and a start
        # after the end are refused by apply() before any work.
        return validate_widgets(cls, strength=strength)

    def apply(self, positive, negative, control_net, image, strength: float = 1.0, start_percent: float = 0.0,
              end_percent: float = 1.0, vae=None):
        from sdxl_core.models.controlnet import ControlNetModel
        from sdxl_core.sampling.control import apply_controlnet

        check_widgets(type(self), strength=strength, start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} comes after end_percent {end_percent}: the ControlNet "
                             "would never act; set start_percent below end_percent")
        if not isinstance(control_net, ControlNetModel):
            raise ValueError(f"control_net needs an SDXL ControlNet from 'Load SDXL ControlNet', got "
                             f"{type(control_net).__name__}")
        for role, conditioning in (("positive", positive), ("negative", negative)):
            _check_for_base(conditioning, control_net, role)
        return apply_controlnet(positive, negative, control_net, image, strength, start_percent, end_percent)


def _check_for_base(conditioning, control_net, role: str) -> None:
    """Refuse, in a sentence, conditioning the ControlNet cannot steer: not a CONDITIONING, or made by another
    stage's text encoder (the refiner's bigG-only context is narrower than the base's)."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"the {role} conditioning is empty; connect a text-encode node to it")
    width = control_net.config.unet.context_dim
    for index, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ValueError(f"{role} conditioning entry {index} is not a [tensor, options] pair")
        found = entry[0].shape[-1]
        if found != width:
            raise ValueError(f"the {role} conditioning has {found}-wide text embeddings, but this ControlNet was "
                             f"made for the SDXL base ({width}-wide: CLIP-L and bigG); SDXL ControlNets steer the "
                             "base, so apply it to the base's conditioning, not the refiner's")


NODE_CLASS_MAPPINGS = {
    node_id("ControlNetLoader"): ControlNetLoader,
    node_id("ApplyControlNet"): ApplyControlNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("ControlNetLoader"): "Load SDXL ControlNet",
    node_id("ApplyControlNet"): "SDXL Apply ControlNet",
}
