"""Loader nodes: an SDXL checkpoint (base or refiner) and a separate SDXL VAE.

Memory: the checkpoint loader reads no UNet or text-encoder weight. It validates the file from its header and
returns a model backed by it (`sdxl_core.checkpoints.loading.open_checkpoint`); the text-encode, sampler and decode
nodes read the networks their step needs when it starts and release them when it ends (`_shared.network_stage`,
the core's `sdxl_core/runtime/stages.py`). So what ComfyUI's output cache keeps between runs is the file's header
and the VAE, never the base's and the refiner's UNets and text encoders, and a two-stage run holds one stage's
networks at a time. Weights are held in the file's precision wherever that is exact for the compute precision (an
fp16 file computed in fp32 on the CPU holds fp16 weights and casts them layer by layer, as ComfyUI's manual cast
does: sdxl_core/operations.py). The price is reading a network from the file (usually the page cache) each time its
step runs again. While a step runs, ComfyUI's model management places the networks (`comfy_host.prepare_networks`);
it tracks them by weak reference, so a released network leaves ComfyUI's loaded models with it.
Loaded files are shared through a weak-valued cache: two loader nodes naming the same file (or a re-queued prompt)
get the same object while ComfyUI's output cache still holds it, and once ComfyUI drops it (another file chosen,
"Free model and node cache", `POST /free {"free_memory": true}`) nothing of it is held here.
"""

from __future__ import annotations

import threading
import weakref

from . import comfy_host
from ._shared import CATEGORY, SDXL_MODEL, SDXL_VAE, WEIGHT_DTYPES, file_identity, node_id, weight_dtypes

_WEIGHT_DTYPE_TOOLTIP = ("Precision of the weights once loaded. 'default' lets ComfyUI choose for your device "
                         "(fp16 on most GPUs, fp32 on the CPU; the VAE never uses fp16, which overflows into black "
                         "images). fp32 is the safe, slow choice; bf16 needs a recent GPU.")

# The vae_name choice that keeps the checkpoint's own VAE (no file in models/vae can have this name: it has spaces
# and no extension).
BAKED_VAE = "baked into the checkpoint"

_cache: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_cache_lock = threading.Lock()


def _cached(key: tuple, load):
    with _cache_lock:
        found = _cache.get(key)
        if found is None:
            found = load()
            _cache[key] = found
        return found


class CheckpointLoader:
    """Load an SDXL base or refiner single-file checkpoint from ComfyUI's checkpoints folder."""

    SEARCH_ALIASES = ('load checkpoint', 'sdxl loader', 'refiner loader', 'ckpt')
    DESCRIPTION = ("Loads an SDXL base or refiner checkpoint (.safetensors) with this pack's own SDXL core. The file "
                   "is checked before any weight is read: SD 1.x/2.x, Flux, LoRAs and VAE-only files are refused "
                   "with a message. Connect MODEL to this pack's text-encode and sampler nodes and VAE to its "
                   "decode/encode nodes.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (SDXL_MODEL, SDXL_VAE)
    RETURN_NAMES = ("model", "vae")
    OUTPUT_TOOLTIPS = ("The SDXL stage (base or refiner, told from the file's tensors): UNet, text encoders and "
                       "tokenizer.", "The VAE chosen by vae_name: the checkpoint's own by default.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (comfy_host.model_filenames("checkpoints"), {
                "tooltip": "SDXL checkpoint from models/checkpoints: the base (e.g. sd_xl_base_1.0.safetensors) "
                           "or the refiner (sd_xl_refiner_1.0.safetensors). Which one it is is read from the "
                           "file's contents, not its name."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": _WEIGHT_DTYPE_TOOLTIP}),
        }, "optional": {
            "vae_name": ([BAKED_VAE, *comfy_host.model_filenames("vae")], {
                "default": BAKED_VAE,
                "tooltip": "Which VAE the model carries: the one baked into the checkpoint, or a separate SDXL VAE "
                           "file from models/vae (the fp16-fix VAE, or the VAE for a checkpoint saved without "
                           "one). The VAE output is the one chosen here."}),
        }}

    def load(self, ckpt_name: str, weight_dtype: str = "default", vae_name: str = BAKED_VAE):
        from sdxl_core.checkpoints.loading import open_checkpoint

        path = comfy_host.model_path("checkpoints", ckpt_name)
        vae_path = None if vae_name == BAKED_VAE else comfy_host.model_path("vae", vae_name)
        dtype, vae_dtype = weight_dtypes(weight_dtype)
        key = file_identity(path, "checkpoint", str(dtype), str(vae_dtype),
                        *(file_identity(vae_path) if vae_path is not None else ()))
        model = _cached(key, lambda: open_checkpoint(path, dtype=dtype, vae_dtype=vae_dtype, vae_path=vae_path,
                                                     device=comfy_host.storage_device()))
        # The VAE is read now and stays with the output, as ComfyUI's own loader keeps its VAE: it is small (about
        # 0.2 GB in fp16) and the VAE nodes take the network itself.
        return (model, model.vae)


class VAELoader:
    """Load a separate SDXL VAE (e.g. the fp16-fix VAE) from ComfyUI's vae folder."""

    SEARCH_ALIASES = ('load vae', 'sdxl vae')
    DESCRIPTION = ("Loads a separate SDXL VAE file (original or diffusers layout), e.g. sdxl_vae.safetensors or "
                   "the fp16-fix VAE, to use instead of a checkpoint's own VAE in this pack's decode/encode nodes.")
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (SDXL_VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The SDXL VAE.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (comfy_host.model_filenames("vae"), {
                "tooltip": "SDXL VAE file from models/vae (the stock SDXL VAE or the fp16-fix one). "
                           "Flux/SD3 16-channel VAEs are refused. An SD 1.x VAE has the same shapes and cannot be "
                           "told apart: it loads, but gives wrong colours."}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": _WEIGHT_DTYPE_TOOLTIP}),
        }}

    def load(self, vae_name: str, weight_dtype: str = "default"):
        from sdxl_core.checkpoints.loading import load_vae

        path = comfy_host.model_path("vae", vae_name)
        _, vae_dtype = weight_dtypes(weight_dtype)
        key = file_identity(path, "vae", str(vae_dtype))
        return (_cached(key, lambda: load_vae(path, dtype=vae_dtype, device=comfy_host.storage_device())),)


NODE_CLASS_MAPPINGS = {
    node_id("CheckpointLoader"): CheckpointLoader,
    node_id("VAELoader"): VAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    node_id("CheckpointLoader"): "Load SDXL Checkpoint (base or refiner)",
    node_id("VAELoader"): "Load SDXL VAE",
}
