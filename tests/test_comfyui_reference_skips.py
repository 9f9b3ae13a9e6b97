"""The comparisons against ComfyUI's code skip, with the reason, when the checkout is there but this interpreter
cannot import it (a module ComfyUI imports, such as einops or psutil, is missing), instead of failing."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

_WITHOUT_MODULES = """
import sys
for name in ("einops", "psutil"):
    sys.modules[name] = None  # what an interpreter without them sees: `import einops` raises ImportError
import pytest
from tests import _comfyui_reference, _comfyui_text_reference
for attempt in (1, 2):
    try:
        _comfyui_reference.load_modules()
    except pytest.skip.Exception as skipped:
        print("sampling skipped:", skipped.msg)
try:
    _comfyui_text_reference.comfy_sdxl_clip()
except pytest.skip.Exception as skipped:
    print("text skipped:", skipped.msg)
print("comfy left:", sorted(name for name in sys.modules if name == "comfy" or name.startswith("comfy.")))
"""


@pytest.mark.skipif(not COMFYUI_PATH, reason="set COMFYUI_PATH to a ComfyUI checkout to check its skips")
def test_a_checkout_this_interpreter_cannot_import_skips_with_the_reason():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_MODULES], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("sampling skipped: ComfyUI's sampling code at") == 2  # the second attempt skips at once
    assert f"cannot be imported by {sys.executable}: import of einops halted" in out
    assert "Install ComfyUI's requirements into this interpreter" in out
    assert "text skipped: ComfyUI's text encoders at" in out and "import of psutil halted" in out
    assert "comfy left: []" in out
