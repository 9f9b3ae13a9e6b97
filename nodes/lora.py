"""LoRA node: an SDXL LoRA file merged into this pack's SDXL model (the math is sdxl_core.checkpoints.lora's).

ComfyUI's own LoraLoader takes ComfyUI's MODEL and CLIP, which this pack's loader does not produce; this node is its
counterpart for SDXL_MODEL, with the same widgets. The model coming in is never modified (the checkpoint loader
caches it and other branches of the graph may use it): the output is a new model that shares every weight the LoRA
leaves alone, so only the patched weights cost memory (see sdxl_core/checkpoints/lora.py).
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import comfy_host
from ._shared import CATEGORY, SDXL_MODEL, check_widgets, file_identity, node_id, validate_widgets

_STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}

# The file each LoRA node of the running prompt read last, {node id: (file identity, tensors)}, so a re-queued
# prompt reads it once, as ComfyUI's own LoraLoader keeps it on its node object. The nodes run as V3 classes, which
# hold nothing between prompts, so the cache lives here and keeps only the nodes of the latest prompt (ComfyUI's
# cache keeps the latest prompt's node objects the same way).
_last_read: dict[str | None, tuple[tuple, dict]] = {}
_last_read_lock = threading.Lock()


class LoraLoader:
    """Merge an SDXL LoRA from ComfyUI's loras folder into an SDXL model."""

    SEARCH_ALIASES = ('load lora', 'lora loader', 'sdxl lora')
    DESCRIPTION = ("Applies an SDXL LoRA (.safetensors from models/loras, kohya or diffusers format) to this pack's "
                   "SDXL model: strength_model to the UNet, strength_clip to the text encoders. Chain several "
                   "to stack LoRAs. SDXL LoRAs are trained for the base model; SD 1.x/2.x LoRAs, LyCORIS "
                   "LoHa/LoKr and DoRA files are refused with a message, and nothing is applied partially.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (SDXL_MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SDXL model with the LoRA merged in; the input model stays as it was.",)
    FUNCTION = "apply"

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
        }, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    @classmethod
    def VALIDATE_INPUTS(cls, strength_model=None):
        # One input per check, so ComfyUI reports a sentence once, on its input; a non-finite strength_clip is
        # refused by apply() before the LoRA file is read.
        return validate_widgets(cls, strength_model=strength_model)

    def apply(self, model, lora_name: str, strength_model: float = 1.0, strength_clip: float = 1.0, prompt=None,
              unique_id=None):
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
        tensors = _read(path, None if unique_id is None else str(unique_id), prompt)
        return (apply_lora(model, tensors, strength_model, strength_clip, name=lora_name,
                           device=comfy_host.compute_device(), storage=comfy_host.storage_device()),)


def _read(path: Path, node: str | None, prompt: dict | None) -> dict:
    """The LoRA file's tensors, read again only when this node names another file (or the file changed)."""
    from sdxl_core.checkpoints.lora import read_lora_file

    identity = file_identity(path)
    with _last_read_lock:
        if prompt is not None:
            for gone in [key for key in _last_read if key is not None and key not in prompt]:
                del _last_read[gone]
        found = _last_read.get(node)
        if found is None or found[0] != identity:
            _last_read.pop(node, None)  # let the previous file's tensors go before reading the next
            found = _last_read[node] = (identity, read_lora_file(path))
        return found[1]


NODE_CLASS_MAPPINGS = {node_id("LoraLoader"): LoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {node_id("LoraLoader"): "Load SDXL LoRA"}
