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

    def set_model_options_post_cfg_function(model_options, post_cfg_function, disable_cfg1_optimization=False):
        # The one model-patcher helper ComfyUI's CFG++ samplers call: queue a post-CFG hook on the options.
        hooks = model_options.get("sampler_post_cfg_function", [])
        model_options["sampler_post_cfg_function"] = hooks + [post_cfg_function]
        if disable_cfg1_optimization:
            model_options["disable_cfg1_optimization"] = True
        return model_options

    stubs = {
        "comfy.model_patcher": {"set_model_options_post_cfg_function": set_model_options_post_cfg_function},
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
    """ComfyUI's k-diffusion sampling module, model_sampling module and UniPC module.

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
                import comfy.extra_samplers.uni_pc as uni_pc  # noqa: PLC0415
                import comfy.k_diffusion.sampling as sampling  # noqa: PLC0415 (only with a configured checkout)
                import comfy.model_sampling as model_sampling  # noqa: PLC0415
                # A stand-in placed in sys.modules is not set as an attribute of its package, which the samplers
                # reach it through (`comfy.model_patcher....`).
                sampling.comfy.model_patcher = stubs["comfy.model_patcher"]
        except pytest.skip.Exception as skipped:
            _IMPORT_FAILURE = str(skipped.msg)
            raise
        finally:
            sys.path[:] = saved_path
            for name in set(sys.modules) - saved_modules:
                if name == "comfy" or name.startswith("comfy.") or name in stubs:
                    del sys.modules[name]
        _LOADED = types.SimpleNamespace(sampling=sampling, model_sampling=model_sampling, uni_pc=uni_pc)
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


def model_sampling_eps():
    """ComfyUI's model sampling object of an SDXL eps model: ModelSamplingDiscrete with the EPS parameterisation
    mixed in, as `model_base.model_sampling` composes it."""
    module = load_modules().model_sampling
    return type("ModelSamplingEPS", (module.ModelSamplingDiscrete, module.EPS), {})()


class KDiffusionModelStub:
    """What ComfyUI's samplers reach through `model`: a callable denoiser plus the attribute chains some samplers
    inspect (`inner_model.inner_model.model_sampling`, `inner_model.model_patcher.get_model_object`)."""

    def __init__(self, denoiser, model_sampling):
        self._denoiser = denoiser
        inner_inner = types.SimpleNamespace(model_sampling=model_sampling)
        patcher = types.SimpleNamespace(get_model_object=lambda name: model_sampling)
        self.inner_model = types.SimpleNamespace(inner_model=inner_inner, model_patcher=patcher)

    def __call__(self, x, sigma, model_options=None, **kwargs):
        kwargs.pop("seed", None)
        kwargs.pop("denoise_mask", None)
        denoised = self._denoiser(x, sigma)
        # An unguided model: what a post-CFG hook (the CFG++ samplers') sees as the unconditional prediction is
        # the prediction itself.
        for hook in (model_options or {}).get("sampler_post_cfg_function", []):
            denoised = hook({"denoised": denoised, "uncond_denoised": denoised, "cond_denoised": denoised,
                             "sigma": sigma, "input": x, "model_options": model_options})
        return denoised


class GuidedModelStub(KDiffusionModelStub):
    """ComfyUI's guided model as its samplers see it: `inner(x, sigma, y) -> x0` on [cond; uncond] batched as
    `calc_cond_batch` batches them (the unconditional branch skipped at cfg 1 unless a sampler disables that),
    combined by ComfyUI's own `cfg_function`, which also runs the samplers' post-CFG hooks."""

    def __init__(self, inner, cond_y, uncond_y, cfg, model_sampling, model_options=None):
        super().__init__(None, model_sampling)
        self._inner, self._cond_y, self._uncond_y, self._cfg = inner, cond_y, uncond_y, cfg
        self._model_options = model_options or {}
        self._cfg_function = lift("comfy/samplers.py", "cfg_function")["cfg_function"]
        self.calls = 0

    def __call__(self, x, sigma, model_options=None, **kwargs):
        options = {**self._model_options, **(model_options or {})}
        batch = x.shape[0]
        if math.isclose(self._cfg, 1.0) and not options.get("disable_cfg1_optimization", False):
            self.calls += 1
            cond = self._inner(x, sigma, self._cond_y.expand(batch, -1))
            uncond = torch.zeros_like(cond)
        else:
            self.calls += 1
            y = torch.cat([self._cond_y.expand(batch, -1), self._uncond_y.expand(batch, -1)])
            cond, uncond = self._inner(torch.cat([x, x]), torch.cat([sigma, sigma]), y).split(batch)
        return self._cfg_function(None, cond, uncond, self._cfg, x, sigma, model_options=options)


def model_sampling_v(zsnr: bool = False):
    """ComfyUI's model sampling of an SDXL v-prediction model, with or without zero terminal SNR."""
    module = load_modules().model_sampling
    return type("ModelSamplingV", (module.ModelSamplingDiscrete, module.V_PREDICTION), {})(zsnr=zsnr)


def rescale_cfg_function(multiplier: float):
    """The sampler_cfg_function ComfyUI's RescaleCFG node installs on a model."""
    node = lift("comfy_extras/nodes_model_advanced.py", "RescaleCFG")["RescaleCFG"]()
    installed = {}

    class _Model:
        def clone(self):
            return self

        def set_model_sampler_cfg_function(self, function, disable_cfg1_optimization=False):
            installed["function"] = function

    node.patch(_Model(), multiplier)
    return installed["function"]
