"""ComfyUI's own sampling code as a test reference, loaded from a checkout named by COMFYUI_PATH.

Only the pure-math pieces are loaded: `comfy/k_diffusion/sampling.py` and `comfy/model_sampling.py` as modules
(with stand-ins for the few imports they need but never call in these tests: the model patcher, and torchsde when
it is not installed; with torchsde installed ComfyUI's Brownian-tree noise runs for real), and
single functions or classes of `comfy/samplers.py`, `comfy/sample.py` and `comfy/conds.py` lifted out with `ast`,
because those modules pull in ComfyUI's whole runtime. Nothing here is vendored: without COMFYUI_PATH the
tests that use it are skipped.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy
import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

requires_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy" / "k_diffusion" / "sampling.py").is_file(),
    reason="set COMFYUI_PATH to a ComfyUI checkout to compare against ComfyUI's own code",
)


@contextlib.contextmanager
def comfyui_imports_or_skip(what: str = "ComfyUI") -> Iterator[None]:
    """Skip the test, with the reason, when this interpreter cannot import the ComfyUI code it needs (the checkout
    is there, but a module ComfyUI imports, such as einops or psutil, is not installed here). The `comfy` modules
    half-imported on the way leave sys.modules again, so a later test does not meet a broken package."""
    before = set(sys.modules)
    try:
        yield
    except ImportError as error:
        for name in set(sys.modules) - before:
            if name == "comfy" or name.startswith("comfy."):
                del sys.modules[name]
        pytest.skip(f"{what} at {COMFYUI_PATH or os.environ.get('COMFYUI_PATH')} cannot be imported by "
                    f"{sys.executable}: {error}. Install ComfyUI's requirements into this interpreter (pip install "
                    "-r requirements.txt in the checkout) to run the comparison")


# ComfyUI's dpmpp_sde / dpmpp_2m_sde draw their default noise from torchsde's BrownianTree.
HAS_TORCHSDE = importlib.util.find_spec("torchsde") is not None


def _stubs() -> dict[str, types.ModuleType]:
    class _NoBrownianTree:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("torchsde is not installed; the Brownian-tree samplers cannot run the reference")

    stubs = {
        "comfy.model_patcher": {},
        "comfy.ldm.util": {"instantiate_from_config": None},
        "comfy.ops": {},
    }
    if not HAS_TORCHSDE:
        stubs["torchsde"] = {"BrownianTree": _NoBrownianTree}
    modules = {}
    for name, attrs in stubs.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        modules[name] = module
    return modules


_LOADED: types.SimpleNamespace | None = None
_IMPORT_FAILURE: str | None = None  # why the checkout could not be imported (skip at once the next time)


def load_modules() -> types.SimpleNamespace:
    """ComfyUI's k-diffusion sampling module and model_sampling module.

    The checkout and the stand-ins are visible only while importing: afterwards sys.path is restored and the
    `comfy` modules and stand-ins leave sys.modules, so other tests (and libraries probing for torchsde) never
    see a partial ComfyUI. Third-party modules imported on the way (scipy, tqdm) stay, as re-importing them
    is not safe.
    """
    global _LOADED, _IMPORT_FAILURE
    if _IMPORT_FAILURE is not None:
        pytest.skip(_IMPORT_FAILURE)
    if _LOADED is None:
        saved_path, saved_modules = list(sys.path), set(sys.modules)
        sys.path.insert(0, COMFYUI_PATH)
        stubs = _stubs()
        sys.modules.update({k: v for k, v in stubs.items() if k not in sys.modules})
        try:
            with comfyui_imports_or_skip("ComfyUI's sampling code"):
                import comfy.k_diffusion.sampling as sampling  # noqa: PLC0415 (only with a configured checkout)
                import comfy.model_sampling as model_sampling  # noqa: PLC0415
        except pytest.skip.Exception as skipped:
            _IMPORT_FAILURE = str(skipped.msg)
            raise
        finally:
            sys.path[:] = saved_path
            for name in set(sys.modules) - saved_modules:
                if name == "comfy" or name.startswith("comfy.") or name in stubs:
                    del sys.modules[name]
        _LOADED = types.SimpleNamespace(sampling=sampling, model_sampling=model_sampling)
    return _LOADED


def lift(relative_path: str, *names: str, namespace: dict | None = None) -> dict:
    """Execute only the named top-level functions/classes of a ComfyUI file in a small namespace."""
    source = (Path(COMFYUI_PATH) / relative_path).read_text()
    tree = ast.parse(source)
    wanted = [node for node in tree.body if getattr(node, "name", None) in names]
    missing = set(names) - {node.name for node in wanted}
    if missing:
        raise LookupError(f"{relative_path} has no top-level {sorted(missing)}")
    scope = {"torch": torch, "math": math, "numpy": numpy, "np": numpy, "logging": __import__("logging")}
    if namespace:
        scope.update(namespace)
    exec(compile(ast.Module(body=wanted, type_ignores=[]), relative_path, "exec"), scope)  # noqa: S102
    return scope


def model_sampling_discrete():
    """ComfyUI's ModelSamplingDiscrete with the SDXL (default) settings."""
    return load_modules().model_sampling.ModelSamplingDiscrete()


class KDiffusionModelStub:
    """What ComfyUI's samplers reach through `model`: a callable denoiser plus the attribute chains some samplers
    inspect (`inner_model.inner_model.model_sampling`, `inner_model.model_patcher.get_model_object`)."""

    def __init__(self, denoiser, model_sampling):
        self._denoiser = denoiser
        inner_inner = types.SimpleNamespace(model_sampling=model_sampling)
        patcher = types.SimpleNamespace(get_model_object=lambda name: model_sampling)
        self.inner_model = types.SimpleNamespace(inner_model=inner_inner, model_patcher=patcher)

    def __call__(self, x, sigma, **kwargs):
        kwargs.pop("seed", None)
        return self._denoiser(x, sigma)
