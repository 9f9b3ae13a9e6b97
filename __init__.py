"""ComfyUI entry point of the SDXL two-stage node pack: the node mappings and the web extension folder.

ComfyUI imports this folder as a package. The pack's model core, `sdxl_core`, is a top-level package next to this
file; when it is not installed (a plain clone into custom_nodes), this folder is appended to sys.path so that it
resolves. The nodes themselves are imported relatively, because ComfyUI owns the top-level name `nodes`.
Nothing heavy happens here: the node modules load the core's networks only when a node runs.
"""

import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

WEB_DIRECTORY = "./web/js"  # the extension imports ../../scripts/app.js, so it must be served at this root

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _error:  # e.g. torch missing: report it, and still let ComfyUI start
    logging.getLogger(__name__).error("SDXL two-stage nodes could not be loaded: %s", _error)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
