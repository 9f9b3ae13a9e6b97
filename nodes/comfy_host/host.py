"""Finding ComfyUI: its modules when this process runs inside it, or None (part of the door, nodes/comfy_host).

Read once and kept; nothing is imported from ComfyUI before the first call, so the pack imports light elsewhere.
"""

from __future__ import annotations

import importlib
import types

_host: types.SimpleNamespace | None = None
_host_checked = False
# Attribute under which a network's ModelPatcher is kept on the network itself, so it lives exactly as long as
# the network (a side table keyed by the network would keep it alive forever: the patcher references it).
_PATCHER_ATTRIBUTE = "_sdxl_twostage_patcher"


def _load_host() -> types.SimpleNamespace | None:
    """ComfyUI's modules, or None when this process is not running inside ComfyUI."""
    global _host, _host_checked
    if _host_checked:
        return _host
    _host_checked = True
    try:
        modules = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in (
            "folder_paths", "comfy.model_management", "comfy.model_patcher", "comfy.utils", "comfy.cli_args")}
    except ImportError:
        _host = None
    else:
        _host = types.SimpleNamespace(**modules)
    return _host


def comfy_available() -> bool:
    """True inside a ComfyUI process."""
    return _load_host() is not None
