"""Text-encode nodes: the base's dual CLIP (CLIP-L + OpenCLIP bigG) and the refiner's bigG alone.

Both produce ComfyUI CONDITIONING ([[context, {"pooled_output": ...}]]) without size fields: the sampler then
conditions on the latent's own size (ComfyUI's rule in `samplers.encode_model_conds`, sgm's and diffusers' default:
original = target = output size, crop 0, aesthetic score 6 / 2.5 for the refiner's positive / negative). To set
them explicitly, put an "SDXL Micro-Conditioning" (and, for the refiner, "SDXL Aesthetic Score") node after this one.
"""

from __future__ import annotations

import contextlib

from . import comfy_host
from ._shared import CATEGORY, CLIP_INPUT, conditioning_on, network_stage, node_id, require_stage

_COMFY_CLIP_TOOLTIP = (" ComfyUI's own CLIP of an SDXL checkpoint (Load Checkpoint, with LoRAs) works too; CLIP Set "
                       "Last Layer and CLIP hooks are refused (SDXL reads the penultimate layer).")
_EMPTY_PROMPT_TOOLTIP = ("What an empty prompt means. 'encode' (ComfyUI): the empty text is run through the text "
                         "encoders like any other. 'zeros' (the SDXL paper's code for an empty negative): all-zero "
                         "embeddings. Only matters when the text is blank.")


@contextlib.contextmanager
def _text_stage(model, kind: str, node: str):
    """Our model with its text encoders in memory and on their device for one encode: our SDXL_MODEL (encoders
    read from the file for this encode and released after it), or a ComfyUI CLIP loaded by ComfyUI and read through
    our encoders built around its tensors."""
    if comfy_host.is_comfy_clip(model):
        model = comfy_host.core_text_encoders_from_comfy_clip(model, node)
        require_stage(model, kind, node)
        yield model
        return
    require_stage(model, kind, node)
    with network_stage(model, "text"):
        # No local name for the networks: one would keep them alive past the stage's release, and inside ComfyUI
        # (network and ModelPatcher refer to each other) until some later garbage collection.
        comfy_host.prepare_networks([model.clip_g] + ([model.clip_l] if model.clip_l is not None else []),
                                    role="text_encoder")
        yield model


class TextEncodeBase:
    """Encode a prompt for the SDXL base with both of its text encoders."""

    SEARCH_ALIASES = ('clip text encode sdxl', 'prompt', 'text_g text_l', 'positive negative')
    DESCRIPTION = ("Encodes a prompt for the SDXL base. SDXL has two text encoders: OpenCLIP bigG (text_g), the "
                   "large one that carries most of the meaning and also gives the pooled embedding, and CLIP-L "
                   "(text_l). Most people put the same prompt in both (leave text_l empty for that). Supports "
                   "ComfyUI's (word:1.2) weighting, prompts longer than 75 tokens and textual-inversion embeddings "
                   "from the embeddings folder (embedding:name; SDXL embeddings only, with both clip_l and clip_g: "
                   "a missing or SD1.5 embedding is an error, not silently dropped). The output conditions on the "
                   "latent's size unless an SDXL Micro-Conditioning node sets it.")
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Base conditioning: 2048-wide text embeddings ([CLIP-L | bigG]) plus bigG's pooled "
                       "embedding. Only the base sampler (or a core KSampler with an SDXL base) accepts it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (CLIP_INPUT, {"tooltip": "The SDXL base from 'Load SDXL Checkpoint'. The refiner cannot encode "
                                              "for the base: use 'SDXL Refiner Text Encode' for it." +
                                              _COMFY_CLIP_TOOLTIP}),
            "text_g": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "Prompt for OpenCLIP bigG, the larger encoder: its embedding and its "
                                             "pooled summary drive composition and subject. Put your full prompt "
                                             "here."}),
            "text_l": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "Prompt for CLIP-L, the smaller encoder (adds detail and style "
                                             "words). Leave empty to use text_g for both, as most workflows do."}),
            "empty_prompt": (["encode", "zeros"], {"default": "encode", "tooltip": _EMPTY_PROMPT_TOOLTIP}),
        }}

    def encode(self, model, text_g: str, text_l: str, empty_prompt: str = "encode"):
        from sdxl_core.pipeline import encode_base_conditioning

        with _text_stage(model, "base", "SDXL Base Text Encode") as model:
            conditioning = encode_base_conditioning(model, text_g, text_l if text_l.strip() else None,
                                                    empty_prompt=empty_prompt,
                                                    embeddings=comfy_host.embedding_directories())
        return (conditioning_on(conditioning, comfy_host.output_device()),)


class TextEncodeRefiner:
    """Encode a prompt for the SDXL refiner (OpenCLIP bigG only)."""

    SEARCH_ALIASES = ('clip text encode sdxl refiner', 'refiner prompt')
    DESCRIPTION = ("Encodes a prompt for the SDXL refiner, which has only the bigG text encoder. Base conditioning "
                   "does not fit the refiner (the embeddings are 2048 wide there, 1280 here), so the refiner needs "
                   "its own encode of the same prompt. Its aesthetic score defaults to 6 for the positive and 2.5 "
                   "for the negative; change it with 'SDXL Aesthetic Score'.")
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Refiner conditioning: 1280-wide bigG embeddings plus the pooled embedding. Only the refiner "
                       "sampler accepts it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (CLIP_INPUT, {"tooltip": "The SDXL refiner from 'Load SDXL Checkpoint'. The base's encoders "
                                              "give conditioning the refiner cannot read." + _COMFY_CLIP_TOOLTIP}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt, usually the same text as the base's text_g (or its "
                                           "negative). Supports (word:1.2) weighting and embedding:name (the "
                                           "embedding's clip_g vectors)."}),
            "empty_prompt": (["encode", "zeros"], {"default": "encode", "tooltip": _EMPTY_PROMPT_TOOLTIP}),
        }}

    def encode(self, model, text: str, empty_prompt: str = "encode"):
        from sdxl_core.pipeline import encode_refiner_conditioning

        with _text_stage(model, "refiner", "SDXL Refiner Text Encode") as model:
            conditioning = encode_refiner_conditioning(model, text, empty_prompt=empty_prompt,
                                                       embeddings=comfy_host.embedding_directories())
        return (conditioning_on(conditioning, comfy_host.output_device()),)


NODE_CLASS_MAPPINGS = {
    node_id("TextEncodeBase"): TextEncodeBase,
    node_id("TextEncodeRefiner"): TextEncodeRefiner,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("TextEncodeBase"): "SDXL Base Text Encode (text_g + text_l)",
    node_id("TextEncodeRefiner"): "SDXL Refiner Text Encode",
}
