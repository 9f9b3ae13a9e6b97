"""VAE nodes: decode a LATENT to an IMAGE and encode an IMAGE to a LATENT with an SDXL VAE, tiled on request and
automatically when memory is short (the core's `vae_decoding` plans tiles and retries after out-of-memory)."""

from __future__ import annotations

from . import comfy_host
from ._shared import CATEGORY, VAE_INPUT, check_widgets, node_id

TILING = {"auto": None, "always": True, "never": False}
_TILING_TOOLTIP = ("'auto' processes the whole image at once and switches to overlapping tiles when memory would "
                   "run out (or did); 'always' forces tiles (lowest memory, tiny seams possible); 'never' refuses "
                   "to tile and fails instead when memory runs out.")


_VAE_TOOLTIP = ("The SDXL VAE: the checkpoint loader's vae output or 'Load SDXL VAE'; ComfyUI's own VAE of an SDXL "
                "checkpoint (Load Checkpoint, Load VAE) works too.")


def _vae_module(vae):
    from sdxl_core.models.vae import AutoencoderKL

    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"expected an SDXL VAE from 'Load SDXL Checkpoint', 'Load SDXL VAE' or ComfyUI's Load "
                         f"Checkpoint / Load VAE, got {type(vae).__name__}")
    return vae


def _untiled_memory(vae, tiling: str, estimate, batch: int, height: int, width: int) -> int:
    """Device memory to ask ComfyUI for before a pass: what an untiled pass needs (so ComfyUI evicts other models,
    e.g. the UNets, as it does for its own VAE nodes), or 0 when tiles are forced (they fit its inference reserve)."""
    from sdxl_core.runtime.vae_decoding import resolve_vae_dtype

    if TILING[tiling] is True:
        return 0
    return estimate(vae, batch, height, width, resolve_vae_dtype(vae, None))


class VAEDecode:
    """Decode latents to images with an SDXL VAE."""

    SEARCH_ALIASES = ('vae decode', 'latent to image', 'decode')
    DESCRIPTION = ("Turns a latent into pixels with the SDXL VAE. Runs in bf16 or fp32 (never fp16, which turns the "
                   "original SDXL VAE's output black) and redoes a decode in higher precision if it ever produces "
                   "NaNs.")
    CATEGORY = f"{CATEGORY}/vae"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The images in ComfyUI's IMAGE format (batch, height, width, RGB in 0..1): wire into Save "
                       "Image or Preview Image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE_INPUT, {"tooltip": _VAE_TOOLTIP}),
            "samples": ("LATENT", {"tooltip": "The latent to decode (from a sampler, or any SDXL LATENT)."}),
            "tiling": (list(TILING), {"default": "auto", "tooltip": _TILING_TOOLTIP}),
        }}

    def decode(self, vae, samples: dict, tiling: str = "auto"):
        from sdxl_core.pipeline import decode
        from sdxl_core.runtime.vae_decoding import estimate_decode_bytes

        check_widgets(VAEDecode, tiling=tiling)
        latents = samples["samples"] if isinstance(samples, dict) and "samples" in samples else None
        if comfy_host.is_comfy_vae(vae):
            memory = 0
            if latents is not None and latents.ndim == 4 and TILING[tiling] is not True:
                memory = comfy_host.vae_memory_required(vae, latents.shape, decode=True)
            vae = comfy_host.core_vae_from_comfy_vae(vae, "SDXL VAE Decode", memory)
            comfy_host.raise_if_interrupted()
            return (decode(vae, samples, tiled=TILING[tiling]).to(comfy_host.output_device()),)
        vae = _vae_module(vae)
        memory = 0
        if latents is not None and latents.ndim == 4:
            down = vae.config.downscale
            memory = _untiled_memory(vae, tiling, estimate_decode_bytes, latents.shape[0], latents.shape[-2] * down,
                                     latents.shape[-1] * down)
        comfy_host.prepare_networks([vae], role="vae", memory_required=memory)
        comfy_host.raise_if_interrupted()
        return (decode(vae, samples, tiled=TILING[tiling]).to(comfy_host.output_device()),)


class VAEEncode:
    """Encode images to latents with an SDXL VAE (for image-to-image refining)."""

    SEARCH_ALIASES = ('vae encode', 'image to latent', 'encode', 'img2img')
    DESCRIPTION = ("Turns an image into an SDXL latent, e.g. to refine a finished picture with the SDXL Latent "
                   "Refiner. Image sides must be multiples of 8 pixels. An alpha channel is ignored.")
    CATEGORY = f"{CATEGORY}/vae"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent in ComfyUI's LATENT format.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE_INPUT, {"tooltip": _VAE_TOOLTIP}),
            "pixels": ("IMAGE", {"tooltip": "The image(s) to encode, e.g. from Load Image; width and height must be "
                                            "multiples of 8."}),
            "tiling": (list(TILING), {"default": "auto", "tooltip": _TILING_TOOLTIP}),
        }}

    def encode(self, vae, pixels, tiling: str = "auto"):
        from sdxl_core.pipeline import encode
        from sdxl_core.runtime.vae_decoding import estimate_encode_bytes

        check_widgets(VAEEncode, tiling=tiling)
        if comfy_host.is_comfy_vae(vae):
            memory = 0
            if pixels.ndim == 4 and TILING[tiling] is not True:
                memory = comfy_host.vae_memory_required(vae, pixels.movedim(-1, 1).shape, decode=False)
            vae = comfy_host.core_vae_from_comfy_vae(vae, "SDXL VAE Encode", memory)
        else:
            vae = _vae_module(vae)
            memory = 0
            if pixels.ndim == 4:
                memory = _untiled_memory(vae, tiling, estimate_encode_bytes, pixels.shape[0], pixels.shape[1],
                                         pixels.shape[2])
            comfy_host.prepare_networks([vae], role="vae", memory_required=memory)
        comfy_host.raise_if_interrupted()
        # No seed: the posterior mean, as ComfyUI's own VAEEncode returns (one image, one latent, as its cache
        # expects), so the two encode nodes give the same latent.
        latent = encode(vae, pixels[..., :3], tiled=TILING[tiling])
        return ({"samples": latent["samples"].to(comfy_host.output_device())},)


NODE_CLASS_MAPPINGS = {
    node_id("VAEDecode"): VAEDecode,
    node_id("VAEEncode"): VAEEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("VAEDecode"): "SDXL VAE Decode",
    node_id("VAEEncode"): "SDXL VAE Encode",
}
