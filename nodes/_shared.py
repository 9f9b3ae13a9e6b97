"""What every node family of the pack shares: type names, categories, widget checks and value plumbing.

Kept free of ComfyUI (see comfy_host/) and of heavy core imports, so the pack imports in milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sdxl_core.config import VAE_DOWNSCALE
from sdxl_core.dtypes import DTYPES_BY_NAME

from . import comfy_host

# Our own socket types for our own model objects. IMAGE, LATENT and CONDITIONING are ComfyUI's own, so core nodes
# connect on either side of ours.
SDXL_MODEL = "SDXL_MODEL"
SDXL_VAE = "SDXL_VAE"
SDXL_CONTROL_NET = "SDXL_CONTROL_NET"  # an sdxl_core ControlNetModel (ComfyUI's own CONTROL_NET is another type)
# Inputs that take our model or ComfyUI's own MODEL / CLIP / VAE (from Load Checkpoint, LoRA loaders, ...). ComfyUI
# matches comma-joined types by overlap (comfy_execution/validation.py `validate_node_input`), and so does the
# frontend when a link is drawn, so one socket takes either and saved workflows keep their links.
MODEL_INPUT = f"{SDXL_MODEL},MODEL"
CLIP_INPUT = f"{SDXL_MODEL},CLIP"
VAE_INPUT = f"{SDXL_VAE},VAE"

NODE_ID_PREFIX = "SDXLTwoStage."
CATEGORY = "sdxl_two_stage"

# Largest side ComfyUI's own size widgets accept (nodes.MAX_RESOLUTION).
MAX_RESOLUTION = 16384
# Pixels per latent cell: image sides must be multiples of this.
LATENT_CELL = VAE_DOWNSCALE

WEIGHT_DTYPES = {"default": None, **DTYPES_BY_NAME}  # "default": the loader picks one for the device


def weight_dtypes(choice: str) -> tuple[torch.dtype, torch.dtype]:
    """(UNet and text-encoder dtype, VAE dtype) for a weight_dtype widget choice: ComfyUI's pick for the device
    under 'default' (the core's outside ComfyUI); ControlNets take the first, as ComfyUI loads them in the UNet's."""
    if choice not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {choice!r}")
    from sdxl_core.checkpoints.loading import default_dtype, default_vae_dtype

    model_default, vae_default = comfy_host.default_dtypes()
    device = comfy_host.compute_device()
    model_default = model_default or default_dtype(device)
    vae_default = vae_default or default_vae_dtype(device)
    chosen = WEIGHT_DTYPES[choice]
    if chosen is None:
        return model_default, vae_default
    # An explicit fp16 is honoured for the UNet and text encoders only: the SDXL VAE overflows in fp16.
    return chosen, (vae_default if chosen == torch.float16 else chosen)


def file_identity(path: Path, *parts: Any) -> tuple:
    """A file as a cache key: its resolved path, modification time and size (a replaced file is another key), plus
    whatever else the cached result depends on."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, *parts)


def node_id(name: str) -> str:
    return NODE_ID_PREFIX + name


def check_widgets(node_class: type, **values: Any) -> None:
    """Raise a ValueError in a sentence unless each value respects its widget's min/max/options in INPUT_TYPES, and
    FLOAT widgets hold finite numbers.

    ComfyUI skips its own range checks for inputs named in VALIDATE_INPUTS, so nodes that validate a combination
    of widgets (K <= N, ...) re-check the ranges here; the same check guards direct calls made without ComfyUI.
    Values that are None (a linked input not known before execution) are skipped.
    """
    declared = {}
    for section in ("required", "optional"):
        declared.update(node_class.INPUT_TYPES().get(section, {}))
    for name, value in values.items():
        if value is None:
            continue
        if name not in declared:
            raise KeyError(f"{node_class.__name__} has no input named {name!r}")
        spec, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        if isinstance(spec, (list, tuple)):
            if value not in spec:
                raise ValueError(f"{name} must be one of {list(spec)[:12]}{' ...' if len(spec) > 12 else ''}, "
                                 f"got {value!r}")
            continue
        if spec == "FLOAT" and not _is_finite_number(value):
            # NaN passes every `<` and `>` range check (ComfyUI's own included) and would surface only after the
            # sampler ran, as a complaint about the weights.
            raise ValueError(f"{name} must be a finite number from {options.get('min', '-inf')} to "
                             f"{options.get('max', 'inf')}, got {value!r}; type a number into the widget")
        if "min" in options and value < options["min"]:
            raise ValueError(f"{name} must be at least {options['min']}, got {value}")
        if "max" in options and value > options["max"]:
            raise ValueError(f"{name} must be at most {options['max']}, got {value}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def float_inputs(node_class: type) -> list[str]:
    """The names of a node's FLOAT widgets (each must be checked for NaN and infinities by VALIDATE_INPUTS)."""
    names = []
    for section in ("required", "optional"):
        for name, entry in node_class.INPUT_TYPES().get(section, {}).items():
            if entry[0] == "FLOAT":
                names.append(name)
    return names


def validate_widgets(node_class: type, **values: Any) -> bool | str:
    """VALIDATE_INPUTS for widgets that need no check beyond their own range: True, or the sentence of
    `check_widgets` (which, unlike ComfyUI's range check, refuses NaN and infinities)."""
    return validation_result(check_widgets, node_class, **values)


def validation_result(check, *args: Any, **kwargs: Any) -> bool | str:
    """Run a check that raises ValueError and turn it into what VALIDATE_INPUTS returns (True or a sentence)."""
    try:
        check(*args, **kwargs)
    except ValueError as error:
        return str(error)
    return True


def conditioning_on(conditioning: list, device: torch.device) -> list:
    """A CONDITIONING with every tensor on `device` (ComfyUI keeps conditioning on its intermediate device)."""
    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return [[move(context), {key: move(value) for key, value in options.items()}] for context, options in conditioning]


def network_stage(model: Any, part: str):
    """A context for one node's work with `part`'s networks ("text", "unet", "vae") of an SDXL model: those the
    loader left in the file are read as it starts and released as it ends (sdxl_core/runtime/stages.py), so
    ComfyUI's cache of the loader's output pins no UNet or text encoder between runs; networks already in memory
    (a LoRA merge, a model built in memory) stay."""
    from sdxl_core.runtime.stages import pipeline_stage

    return pipeline_stage(model, part)


def require_stage(model: Any, kind: str, slot: str) -> None:
    """Refuse, in a sentence, an SDXL model of the other stage wired into a slot meant for `kind`."""
    from sdxl_core.config import require_stage as core_require_stage

    core_require_stage(model, kind, slot)
