"""The pack's ComfyUI nodes, one family per module; this package only gathers their mappings.

A family whose module cannot be imported (a missing optional dependency, a core module not installed) is left out
with a logged error naming it, so the other families still load and ComfyUI does not mark the whole pack as failed.
"""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

FAMILIES = ("loaders", "lora", "model_sampling", "text_encode", "micro_conditioning", "latent", "sampling",
            "vae_nodes", "controlnet")

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
FAILED_FAMILIES: dict[str, str] = {}

for _family in FAMILIES:
    try:
        _module = importlib.import_module(f"{__name__}.{_family}")
    except Exception as error:  # noqa: BLE001 - report any import failure of one family, keep the others
        FAILED_FAMILIES[_family] = f"{type(error).__name__}: {error}"
        logger.error("SDXL two-stage nodes: the %s nodes are unavailable: %s", _family, FAILED_FAMILIES[_family])
        continue
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
