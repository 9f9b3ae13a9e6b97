"""LoRA node: an SDXL LoRA file merged into this pack's SDXL model (the math is sdxl_core.checkpoints.lora's).

ComfyUI's own LoraLoader takes ComfyUI's MODEL and CLIP, which this pack's loader does not produce; this node is its
counterpart for SDXL_MODEL, with the same widgets. The model coming in is never modified (the checkpoint loader
caches it and other branches of the graph may use it): the output is a new model that shares every weight the LoRA
leaves alone, so only the patched weights cost memory (see sdxl_core/checkpoints/lora.py).
"""

from __future__ import annotations

from pathlib import Path

from . import comfy_host
from ._shared import CATEGORY, SDXL_MODEL, check_widgets, file_identity, node_id

_STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}


class LoraLoader:
    """Merge an SDXL LoRA from ComfyUI's loras folder into an SDXL model."""

    DESCRIPTION = ("Applies an SDXL LoRA (.safetensors from models/loras, kohya or diffusers format) to this pack's "
                   "SDXL model: strength_model to the UNet, strength_clip to the text encoders. Chain several "
                   "to stack LoRAs. SDXL LoRAs are trained for the base model; SD 1.x/2.x LoRAs, LyCORIS "
                   "LoHa/LoKr and DoRA files are refused with a message, and nothing is applied partially.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (SDXL_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SDXL model with the LoRA merged in; the input model stays as it was.",)
    FUNCTION = "apply"

    def __init__(self):
        self._loaded: tuple[tuple, dict] | None = None  # the last file read: (identity, tensors), as ComfyUI keeps

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (SDXL_MODEL, {
                "tooltip": "The SDXL model from 'Load SDXL Checkpoint' (or from another 'Load SDXL LoRA' to stack "
                           "LoRAs). Use the base model: SDXL LoRAs are trained for it."}),
            "lora_name": (comfy_host.model_filenames("loras"), {
                "tooltip": "SDXL LoRA file from models/loras (kohya lora_unet_/lora_te1_/lora_te2_ names or "
                           "diffusers/PEFT names)."}),
            "strength_model": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the LoRA changes the UNet (the "
                                         "image model): 1 as trained, 0 leaves it, negative values invert it."}),
            "strength_clip": ("FLOAT", {**_STRENGTH, "tooltip": "How strongly the LoRA changes the text encoders "
                                        "(how prompts are read): 1 as trained, 0 leaves them."}),
        }}

    def apply(self, model, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0):
        from sdxl_core.checkpoints.lora import apply_lora
        from sdxl_core.models.bundle import SDXLModel

        if not isinstance(model, SDXLModel):
            raise ValueError(f"model needs an SDXL model from the SDXL checkpoint loader, got {type(model).__name__}")
        check_widgets(type(self), strength_model=strength_model, strength_clip=strength_clip)
        if strength_model == 0 and strength_clip == 0:
            return (model,)
        path = comfy_host.model_path("loras", lora_name)
        # Merged on the compute device (the GPU in ComfyUI); the new model lives on the offload device like a
        # freshly loaded checkpoint, even if the input's weights are on the GPU right now, so ComfyUI's model
        # management counts every byte of it when it loads it.
        return (apply_lora(model, self._read(path), strength_model, strength_clip, name=lora_name,
                           device=comfy_host.compute_device(), storage=comfy_host.storage_device()),)

    def _read(self, path: Path) -> dict:
        from sdxl_core.checkpoints.lora import read_lora_file

        identity = file_identity(path)
        if self._loaded is None or self._loaded[0] != identity:
            self._loaded = None  # let the previous file's tensors go before reading the next
            self._loaded = (identity, read_lora_file(path))
        return self._loaded[1]


NODE_CLASS_MAPPINGS = {node_id("LoraLoader"): LoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("LoraLoader"): "Load SDXL LoRA"}
