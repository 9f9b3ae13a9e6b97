"""Import ComfyUI's own SDXL text-encoding code (comfy.sdxl_clip) from the checkout named by COMFYUI_PATH."""

import os
import sys

import pytest

from tests._comfyui_reference import comfyui_imports_or_skip


def comfy_sdxl_clip():
    """The `comfy.sdxl_clip` module of a ComfyUI checkout, forced onto the CPU; skips the test without one, or when
    this interpreter lacks a module ComfyUI imports."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isdir(os.path.join(path, "comfy")):
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to compare against ComfyUI itself")
    if path not in sys.path:
        sys.path.insert(0, path)
    with comfyui_imports_or_skip("ComfyUI's text encoders"):
        import comfy.cli_args

        if "comfy.model_management" not in sys.modules:
            comfy.cli_args.args.cpu = True  # must precede model_management's device probing
        import comfy.sdxl_clip

    return comfy.sdxl_clip
