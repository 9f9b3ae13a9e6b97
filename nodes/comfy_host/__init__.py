"""The one door from this node pack to ComfyUI's services, opened lazily and optional.

Inside ComfyUI every function here delegates to ComfyUI itself: model files come from `folder_paths`, progress goes
through `comfy.utils.ProgressBar` (whose global hook is also ComfyUI's interruption point), interruption is read
from `comfy.model_management`, networks are placed on devices by ComfyUI's model management (each one wrapped in a
`comfy.model_patcher.ModelPatcher`, as ComfyUI's own VAE is), and latent previews follow `--preview-method`.

Without ComfyUI (CI, scripts, the tests) the same functions fall back to plain behaviour: model folders are the
ones given to `set_standalone_model_folders` (or the SDXL_TWOSTAGE_<FOLDER> environment variables, os.pathsep
separated), the device is the CPU, progress and previews are dropped and nothing is ever interrupted. Nothing else
in the pack imports ComfyUI, and nothing here imports it at module load.

This module holds ComfyUI's services (model files, devices and memory, interruption, progress and previews, the V3
API); `host` finds ComfyUI, and its two parts on ComfyUI's own objects are `core_types` (MODEL / CLIP / VAE in and
out) and `controls` (ComfyUI's ControlNet objects on CONDITIONING). The nodes reach all of it through this one name.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .host import _PATCHER_ATTRIBUTE, _load_host, comfy_available

logger = logging.getLogger(__name__)

# File extensions ComfyUI lists for model folders; only safetensors and diffusers folders are loadable here,
# so the standalone listing shows just those.
_STANDALONE_EXTENSIONS = (".safetensors",)
_ENV_PREFIX = "SDXL_TWOSTAGE_"
_standalone_folders: dict[str, list[Path]] = {}


# ---------------------------------------------------------------------------------------------------------------
# Model files


def set_standalone_model_folders(folders: dict[str, Sequence[str | os.PathLike]]) -> None:
    """Outside ComfyUI: the directories to list for each model folder key ("checkpoints", "vae", ...)."""
    _standalone_folders.clear()
    for key, paths in folders.items():
        _standalone_folders[key] = [Path(p) for p in paths]


def _standalone_dirs(folder: str) -> list[Path]:
    if folder in _standalone_folders:
        return _standalone_folders[folder]
    value = os.environ.get(_ENV_PREFIX + folder.upper(), "")
    return [Path(p) for p in value.split(os.pathsep) if p]


def model_filenames(folder: str) -> list[str]:
    """Names (relative paths) of the model files in one of ComfyUI's model folders, for a combo input."""
    host = _load_host()
    if host is not None:
        return list(host.folder_paths.get_filename_list(folder))
    names = set()
    for directory in _standalone_dirs(folder):
        if directory.is_dir():
            for path in directory.rglob("*"):
                if path.is_file() and path.suffix in _STANDALONE_EXTENSIONS:
                    names.add(path.relative_to(directory).as_posix())
    return sorted(names)


def model_path(folder: str, name: str) -> Path:
    """The full path of a model file chosen from `model_filenames(folder)`; a clear error when it is gone."""
    host = _load_host()
    if host is not None:
        return Path(host.folder_paths.get_full_path_or_raise(folder, name))
    for directory in _standalone_dirs(folder):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(d) for d in _standalone_dirs(folder)) or "no folder configured"
    raise FileNotFoundError(f"model file {name!r} was not found in the {folder!r} folders ({searched})")


def embedding_directories() -> list[Path]:
    """The existing folders of ComfyUI's `embeddings` model folder, where prompts' `embedding:name` is looked up
    (ComfyUI hands the same list to its own CLIP tokenizers); outside ComfyUI the standalone "embeddings" folders."""
    host = _load_host()
    if host is not None:
        folders = [Path(p) for p in host.folder_paths.get_folder_paths("embeddings")]
    else:
        folders = _standalone_dirs("embeddings")
    return [folder for folder in folders if folder.is_dir()]


# ---------------------------------------------------------------------------------------------------------------
# Devices, dtypes and memory


def compute_device() -> torch.device:
    """Where the networks run: ComfyUI's torch device (honours --cpu, MPS, DirectML), else the CPU."""
    host = _load_host()
    return host.model_management.get_torch_device() if host is not None else torch.device("cpu")


def storage_device() -> torch.device:
    """Where loaded weights wait between runs (ComfyUI's offload device), and where they are first loaded."""
    host = _load_host()
    return host.model_management.unet_offload_device() if host is not None else torch.device("cpu")


def output_device() -> torch.device:
    """Where LATENT and IMAGE tensors handed to other nodes live (ComfyUI's intermediate device: the CPU)."""
    host = _load_host()
    return host.model_management.intermediate_device() if host is not None else torch.device("cpu")


def default_dtypes() -> tuple[torch.dtype | None, torch.dtype | None]:
    """(UNet/text-encoder dtype, VAE dtype) ComfyUI would pick for the compute device; (None, None) lets the core
    choose for the CPU outside ComfyUI."""
    host = _load_host()
    if host is None:
        return None, None
    mm = host.model_management
    # The SDXL VAE overflows in float16; ComfyUI's SD/SDXL VAE working dtypes are bf16 and fp32
    # (docs/checkpoints.md#loading-and-dtypes).
    # Each dtype is chosen for the device that network runs on, as ComfyUI does (--cpu-vae: the CPU's).
    return mm.unet_dtype(mm.get_torch_device()), mm.vae_dtype(mm.vae_device(), [torch.bfloat16, torch.float32])


class _Holder(torch.nn.Module):
    """A plain container a ModelPatcher may write its bookkeeping attributes onto (`device`, ...), which our own
    networks expose as read-only properties."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network


# Where ComfyUI runs and parks each kind of network (its own CLIP and VAE honour --cpu-vae, --gpu-only, ...).
_ROLES = {
    "unet": ("get_torch_device", "unet_offload_device"),
    "text_encoder": ("text_encoder_device", "text_encoder_offload_device"),
    "vae": ("vae_device", "vae_offload_device"),
}


def _patcher_for(host: types.SimpleNamespace, network: torch.nn.Module, role: str):
    patcher = network.__dict__.get(_PATCHER_ATTRIBUTE)
    if patcher is None:
        mm = host.model_management
        load, offload = (getattr(mm, name)() for name in _ROLES[role])
        patcher = host.model_patcher.ModelPatcher(_Holder(network), load_device=load, offload_device=offload)
        network.__dict__[_PATCHER_ATTRIBUTE] = patcher
    return patcher


def network_patchers(networks: Iterable[torch.nn.Module], role: str = "unet") -> list:
    """ComfyUI's ModelPatchers placing these networks of ours (made on first use, as `prepare_networks` makes
    them), to load together with others in one call; none outside ComfyUI."""
    host = _load_host()
    return [] if host is None else [_patcher_for(host, network, role) for network in networks]


def prepare_networks(networks: Iterable[torch.nn.Module], role: str = "unet", memory_required: int = 0,
                     extra_patchers: Sequence = ()) -> None:
    """Make these networks resident on their compute device before use. Inside ComfyUI this goes through
    `model_management.load_models_gpu`, so ComfyUI evicts other models to make room, counts ours, and moves them
    back to the offload device when it needs the memory or is asked to free it. `role` ("unet", "text_encoder",
    "vae") picks the devices ComfyUI uses for its own networks of that kind; `extra_patchers` (ComfyUI's own, e.g.
    a ControlNet's) are loaded in the same call."""
    if role not in _ROLES:
        raise ValueError(f"role must be one of {sorted(_ROLES)}, got {role!r}")
    networks = list(networks)
    host = _load_host()
    if host is None:
        device = compute_device()
        for network in networks:
            network.to(device)
        return
    patchers = list({id(p): p for p in [*(_patcher_for(host, n, role) for n in networks), *extra_patchers]}.values())
    # Always whole: ComfyUI's partial (low-VRAM) loading streams only layers built with comfy.ops, and ours are
    # plain torch layers, which a partial load would leave behind on the offload device.
    host.model_management.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


# ---------------------------------------------------------------------------------------------------------------
# Interruption, progress and previews


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI (never outside ComfyUI); usable as the core's `cancel`."""
    host = _load_host()
    return bool(host is not None and host.model_management.processing_interrupted())


def raise_if_interrupted() -> None:
    """Raise ComfyUI's own InterruptProcessingException if the user cancelled, so the run ends as interrupted."""
    host = _load_host()
    if host is not None:
        host.model_management.throw_exception_if_processing_interrupted()


def _preview_method(host: types.SimpleNamespace) -> str:
    method = getattr(host.cli_args.args, "preview_method", None)
    return str(getattr(method, "value", method) or "none")


class StepProgress:
    """A per-step progress bar for one node, with a latent preview when ComfyUI has previews switched on."""

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        host = _load_host()
        self._bar = host.utils.ProgressBar(self.total) if host is not None else None
        self._preview_size = 512
        self._previewer = None
        if host is not None:
            method = _preview_method(host)
            self._preview_size = int(getattr(host.cli_args.args, "preview_size", 512) or 512)
            if method == "taesd":
                # ComfyUI's own TAESD previewer for SDXL (models/vae_approx/taesdxl_decoder*), if installed.
                self._previewer = _comfy_taesd_previewer()
            if self._previewer is None and method != "none":
                self._previewer = _latent_rgb_previewer
        self.done = 0

    def update(self, step: int, denoised: torch.Tensor | None = None) -> None:
        """Report that `step` steps are done; `denoised` is the current x0 in the model's (scaled) latent space.
        Inside ComfyUI this raises InterruptProcessingException when the user cancelled."""
        self.done = min(int(step), self.total)
        if self._bar is None:
            return
        preview = None
        if self._previewer is not None and denoised is not None:
            preview = ("JPEG", self._previewer(denoised), self._preview_size)
        self._bar.update_absolute(self.done, self.total, preview)


def _latent_rgb_previewer(denoised: torch.Tensor):
    from PIL import Image

    from sdxl_core.runtime.preview import latent_to_rgb

    return Image.fromarray(latent_to_rgb(denoised[0]).numpy())


def _comfy_taesd_previewer():
    try:
        latent_preview = importlib.import_module("latent_preview")
        latent_formats = importlib.import_module("comfy.latent_formats")
    except ImportError:
        return None
    previewer = latent_preview.get_previewer(compute_device(), latent_formats.SDXL())
    if previewer is None:
        return None
    return previewer.decode_latent_to_preview


# ---------------------------------------------------------------------------------------------------------------
# The V3 node schema

# The comfy_api version the pack's V3 nodes are written against: a pinned alias, not `latest`, so a ComfyUI update
# that changes the newest API does not change these nodes (ComfyUI keeps old aliases importable).
V3_API_VERSION = "v0_0_2"


def v3_capable() -> bool:
    """True inside a ComfyUI that serves V3 nodes: its node loader has imported comfy_api before loading packs
    (ComfyUI 0.3.47 and later). Nothing is imported to find out, so the pack's import stays light elsewhere."""
    return "comfy_api.latest" in sys.modules


def v3_api() -> types.ModuleType:
    """ComfyUI's V3 API at the pinned version (its `io` schema module and `ComfyExtension`)."""
    try:
        return importlib.import_module(f"comfy_api.{V3_API_VERSION}")
    except ImportError as error:
        raise RuntimeError(f"this ComfyUI has no comfy_api.{V3_API_VERSION} ({error}); the pack needs ComfyUI "
                           "0.3.64 or later (see requires-comfyui in pyproject.toml)") from error


# The parts on ComfyUI's own objects, under this one door (they use the services above, so they come after them).
from .controls import (  # noqa: E402
    adapt_comfy_controls,
    cleanup_controls,
    control_memory,
    control_patchers,
    pre_run_controls,
)
from .core_types import (  # noqa: E402
    comfy_model_from_core,
    comfy_objects_from_core,
    core_stage_from_comfy_model,
    core_text_encoders_from_comfy_clip,
    core_vae_from_comfy_vae,
    is_comfy_clip,
    is_comfy_model,
    is_comfy_vae,
    model_memory_required,
    vae_memory_required,
)
