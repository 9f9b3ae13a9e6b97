"""ComfyUI entry point of the SDXL two-stage node pack: its nodes and the web extension folder.

Inside ComfyUI the nodes are registered in the V3 schema through `comfy_entrypoint` (nodes/v3.py); ComfyUI takes
`NODE_CLASS_MAPPINGS` over `comfy_entrypoint` when a pack has both, so the V1 mappings are handed out only outside
a V3-capable ComfyUI (scripts, tests, tools that read a pack's mappings).

ComfyUI imports this folder as a package. The pack's model core, `sdxl_core`, lives in this folder and the nodes
import it by its top-level name; it is loaded here from this folder explicitly, without putting the folder on
sys.path (which would also expose `tests`, `scripts` and the rest as top-level modules, and let whichever copy of
the pack came first on the path supply the core of every copy). When a core from somewhere else is already
imported (a second copy of the pack in custom_nodes, or a separately installed sdxl_core), this copy loads no
nodes and says so, because its nodes would silently run the other copy's code.
The nodes themselves are imported relatively, because ComfyUI owns the top-level name `nodes`.
Nothing heavy happens here: the node modules load the core's networks only when a node runs.
"""

import importlib.util
import logging
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
_CORE_DIR = os.path.join(_PACK_DIR, "sdxl_core")
_logger = logging.getLogger(__name__)

WEB_DIRECTORY = "./web/js"  # the extension imports ../../scripts/app.js, so it must be served at this root


def _foreign_core() -> str | None:
    """Where an already imported `sdxl_core` comes from, when that is not this pack's folder (None otherwise)."""
    loaded = sys.modules.get("sdxl_core")
    if loaded is None:
        return None
    where = os.path.dirname(os.path.realpath(getattr(loaded, "__file__", None) or "?"))
    return None if where == os.path.realpath(_CORE_DIR) else where


def _import_own_core() -> None:
    """Import this folder's sdxl_core under its top-level name, unless it is imported already."""
    if "sdxl_core" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("sdxl_core", os.path.join(_CORE_DIR, "__init__.py"),
                                                  submodule_search_locations=[_CORE_DIR])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdxl_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["sdxl_core"]
        raise


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
_other_core = _foreign_core()
if _other_core is not None:
    _logger.error("SDXL two-stage nodes: the copy of the pack at %s was not loaded, because sdxl_core is already "
                  "imported from %s (another copy of this pack, or an installed sdxl_core) and the two would mix. "
                  "Keep one copy in custom_nodes (or pip uninstall the other) and restart ComfyUI.",
                  _PACK_DIR, _other_core)
else:
    try:
        _import_own_core()
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
        from .nodes import comfy_host as _comfy_host
    except ImportError as _error:  # e.g. torch missing: report it, and still let ComfyUI start
        _logger.error("SDXL two-stage nodes could not be loaded: %s", _error)
    else:
        if _comfy_host.v3_capable():
            _V3_NODES, _V3_NAMES = NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
            del NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

            async def comfy_entrypoint():
                from .nodes import v3

                return v3.extension(_V3_NODES, _V3_NAMES)

__all__ = [name for name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "comfy_entrypoint")
           if name in globals()] + ["WEB_DIRECTORY"]
