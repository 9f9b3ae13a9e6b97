"""Load the SDXL checkpoints users have (and refuse everything else with a clear `CheckpointError`).

Accepted: an original single-file `.safetensors` base or refiner (fp16, bf16, fp32), a diffusers pipeline folder
(single or sharded weights), and a separate VAE file (original or diffusers names) replacing the checkpoint's VAE.
The architecture is read from the tensors' shapes (`detect.infer_config`), every key and shape is
validated before a byte of tensor data is read, and the weights then stream in one tensor at a time: modules are
built on the meta device and adopt each tensor, already cast to the target dtype and device, with
`load_state_dict(assign=True)`. Peak host memory is therefore the weights in the target dtype plus one tensor.

Default dtypes (`dtype=None`): the UNet and text encoders run in float16 on CUDA and float32 on the CPU (CPU half
matmuls are slow and partly unsupported); the VAE runs in bfloat16 on CUDA, never float16 by default, because the
original SDXL VAE overflows in float16 (docs/checkpoints.md#loading-and-dtypes), and in float32 on
the CPU. The text encoders' tokenizers come from the vocabulary bundled in the package, never from a hub (a
diffusers folder's tokenizer/ and tokenizer_2/ are therefore not read).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import CLIP_CONTEXT_LENGTH, SDXLConfig, VAEConfig
from ..operations import manual_cast
from ..runtime.vae_decoding import default_vae_dtype  # one rule for the VAE's dtype, shared with decoding
from .detect import (
    PREDICTION_MARKERS,
    V_PRED_MARKER,
    VAE_PREFIX,
    ZTSNR_MARKER,
    Identification,
    component_prefixes,
    config_hints,
    infer_config,
    infer_vae_config,
)
from .errors import (
    CheckpointError,
    CorruptCheckpointError,
    NonFiniteWeightError,
    StateDictMismatchError,
    WrongArchitectureError,
    WrongComponentError,
    WrongVariantError,
)
from .files import LazyTensor, write_safetensors
from .source import CheckpointSource, open_source
from .validation import BOOKKEEPING_KEYS, ValidationReport, build_component, expected_shapes, validate

logger = logging.getLogger(__name__)

__all__ = ["CheckpointError", "check_checkpoint", "load_checkpoint", "open_checkpoint", "load_vae", "save_checkpoint",
           "inspect_checkpoint", "inspect_vae", "default_dtype", "default_vae_dtype"]

# open_clip's initial contrastive temperature, ln(1/0.07). SDXL files carry a `logit_scale` that text encoding never
# reads; we write this value so saved files have the published key set.
_OPENCLIP_LOGIT_SCALE = math.log(1 / 0.07)
_MODELSPEC = {"base": "stable-diffusion-xl-v1-base", "refiner": "stable-diffusion-xl-v1-refiner"}
_SDXL_LATENT_CHANNELS = 4
_INPAINT_UNET_CHANNELS = 9


def default_dtype(device: torch.device | str) -> torch.dtype:
    """UNet / text-encoder dtype when none is asked for: float16 on CUDA, float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _check_dtype(dtype: torch.dtype, what: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{what} must be a floating-point torch.dtype (torch.float16, torch.bfloat16, "
                         f"torch.float32), got {dtype!r}")
    return dtype


def refuse_unless_sdxl(source: CheckpointSource, expect: str | None = None) -> str:
    """Raise the fitting CheckpointError unless `source` is an SDXL base/refiner (of the `expect`ed kind)."""
    if expect not in (None, "base", "refiner"):
        raise ValueError(f"expect must be None, 'base' or 'refiner', got {expect!r}")
    found: Identification = source.identification
    name = source.path.name
    if found.kind in ("sd1", "sd2", "sd3", "flux", "cascade"):
        raise WrongArchitectureError(f"{name} is {found.description}; this project runs SDXL (base and refiner). "
                                     "Load it with a loader for its own model family.")
    if found.kind == "sdxl-other-schedule":
        raise WrongArchitectureError(f"{name} is {found.description}; this project samples SDXL's discrete schedule "
                                     "(eps or v-prediction, with or without zero terminal SNR), which would turn "
                                     "this model's output into noise or washed-out images. Use ComfyUI's own "
                                     "checkpoint loader for it.")
    if found.kind == "sdxl-vae":
        raise WrongComponentError(f"{name} is a VAE-only file, not a checkpoint (a checkpoint has a UNet, text "
                                  "encoders and a VAE). Select it as the separate VAE instead (models/vae).")
    if found.kind in ("lora", "unet-only", "text-encoder"):
        raise WrongComponentError(f"{name} is {found.description}; a full SDXL checkpoint (UNet + text encoders + "
                                  "VAE) is needed here.")
    if not found.is_sdxl_checkpoint:
        raise WrongArchitectureError(f"{name} is {found.description}. These nodes load SDXL base and refiner "
                                     "checkpoints (keys model.diffusion_model.*, conditioner.embedders.*, "
                                     "first_stage_model.*).")
    kind = found.kind.removeprefix("sdxl-")
    if expect is not None and kind != expect:
        role = ("the base turns text into an image from pure noise; the refiner only polishes the last, low-noise "
                "steps")
        raise WrongVariantError(f"{name} is an SDXL {kind} checkpoint, but an SDXL {expect} is required here ({role}). "
                                f"Select an SDXL {expect} checkpoint.")
    return kind


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf: min and max are finite (aminmax propagates NaN).

    One fused reduction pass, about 15x faster on the CPU than `isfinite(t).all()`, which materialises a mask.
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _read_checked(lazy: LazyTensor, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Read one tensor, move and cast it, and refuse NaN/Inf (naming the tensor)."""
    raw = lazy.read()
    if tuple(raw.shape) != tuple(lazy.shape):
        raise CorruptCheckpointError(f"{lazy.origin}: read {list(raw.shape)}, the header says {list(lazy.shape)}")
    if not raw.is_floating_point():
        return raw.to(device)
    tensor = raw.to(device)
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if not _all_finite(tensor):
        stored_bad = int((~torch.isfinite(raw)).sum())
        if stored_bad:
            raise NonFiniteWeightError(
                f"{key} holds {stored_bad} NaN/Inf values (of {raw.numel()}): the checkpoint is broken (a failed "
                f"merge or fine-tune?) and would only produce black or noise images. Source: {lazy.origin}")
        peak = float(raw.abs().max())
        raise NonFiniteWeightError(f"{key} has values up to {peak:.4g}, which overflow {dtype}; load this "
                                   "checkpoint in bf16 or fp32 instead (the loader node's weight_dtype bf16 or "
                                   "fp32, the command line's --dtype)")
    return tensor


def _load_component(module: nn.Module, tensors: Mapping[str, LazyTensor], prefix: str, keys: list[str], *,
                    dtype: torch.dtype, device: torch.device, storage: Mapping[str, torch.dtype] | None = None
                    ) -> None:
    """Stream the given single-file keys into `module` (built on meta) and check nothing is left unloaded; each
    floating tensor is held in `dtype`, or in `storage[key]` where given."""
    storage = storage or {}
    state = {key[len(prefix):]: _read_checked(tensors[key], key, storage.get(key, dtype), device) for key in keys}
    result = module.load_state_dict(state, strict=True, assign=True)
    del state
    if result.missing_keys or result.unexpected_keys:  # validate() already guarantees this; never load half a model
        raise StateDictMismatchError(f"{type(module).__name__}: missing {result.missing_keys[:5]}, unexpected "
                                     f"{result.unexpected_keys[:5]}")
    on_meta = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{type(module).__name__} still has unloaded tensors after loading: {on_meta[:5]}")
    module.requires_grad_(False).eval()


def _note_position_ids(source: CheckpointSource, prefix: str, report: ValidationReport) -> None:
    """Position ids are bookkeeping; arange(77) is always used, and damaged ones are reported as repaired."""
    key = prefix + "text_model.embeddings.position_ids"
    if key not in source.tensors:
        return
    ids = source.tensors[key].read().reshape(-1)
    expected = torch.arange(CLIP_CONTEXT_LENGTH)
    if ids.is_floating_point() or ids.numel() != CLIP_CONTEXT_LENGTH or not torch.equal(ids.long(), expected):
        report.notes.append(f"{key} was not arange({CLIP_CONTEXT_LENGTH}) (a common defect of merged checkpoints); "
                            f"arange({CLIP_CONTEXT_LENGTH}) is used")


def _raise_if_invalid(report: ValidationReport, name: str, what: str) -> None:
    if not report.ok:
        lines = "\n  ".join(report.problems())
        raise StateDictMismatchError(f"{name} does not match the {what} that its shapes describe:\n  {lines}\n"
                                     "If the file is damaged (an interrupted download or copy), download it again; "
                                     f"a modified {what} with other layers cannot be loaded by this project",
                                     report=report)


def _plan(source: CheckpointSource, expect: str | None, vae_config: VAEConfig | None
          ) -> tuple[SDXLConfig, dict[str, nn.Module], ValidationReport]:
    """Config from shapes, the components built on meta, and the strict comparison of keys and shapes."""
    kind = refuse_unless_sdxl(source, expect)
    has_vae = any(key.startswith(VAE_PREFIX) for key in source.tensors)
    if vae_config is None and not has_vae:
        raise StateDictMismatchError(f"{source.path.name} has no VAE (first_stage_model.*), so it cannot be loaded on "
                                     "its own: give a separate SDXL VAE file with it (--vae on the command line, "
                                     "vae_path in Python, the vae_name input of the ComfyUI loader node)")
    try:
        config = infer_config(source.shapes, source.hints, vae=vae_config)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f"{source.path.name}: {error}. The file is incomplete or damaged (download it "
                                     "again) or a modified SDXL variant this project cannot run") from None
    # A 9-channel base is an inpainting UNet (latent + mask + masked image), which the sampler feeds; nothing else.
    unet_inputs = (_SDXL_LATENT_CHANNELS, _INPAINT_UNET_CHANNELS) if kind == "base" else (_SDXL_LATENT_CHANNELS,)
    if config.unet.in_channels not in unet_inputs or config.vae.latent_channels != _SDXL_LATENT_CHANNELS:
        raise WrongArchitectureError(
            f"{source.path.name} is an SDXL {kind} variant with a {config.unet.in_channels}-channel UNet input and a "
            f"{config.vae.latent_channels}-channel VAE; this project run the 4-channel base and refiner and the "
            "9-channel inpainting base")
    prefixes = component_prefixes(kind)
    if vae_config is not None:  # the separate VAE replaces the checkpoint's: those keys are neither needed nor read
        prefixes = {name: prefix for name, prefix in prefixes.items() if name != "vae"}
    modules = {name: build_component(name, config) for name in prefixes}
    skip = (VAE_PREFIX,) if vae_config is not None else ()
    # The prediction markers are read into the config (`detect.prediction_from_keys`), not loaded as weights.
    shapes = {key: shape for key, shape in source.shapes.items() if key not in PREDICTION_MARKERS}
    report = validate(shapes, expected_shapes(modules, prefixes), prefixes, skip_prefixes=skip)
    return config, modules, report


def inspect_checkpoint(path: Path | str | CheckpointSource, *, expect: str | None = None,
                       vae_config: VAEConfig | None = None) -> tuple[CheckpointSource, SDXLConfig, ValidationReport]:
    """Identify, infer the config of and validate a checkpoint from its header(s) alone; raise if unusable."""
    source = path if isinstance(path, CheckpointSource) else open_source(path)
    config, _, report = _plan(source, expect, vae_config)
    return source, config, report


def check_checkpoint(path: Path | str, *, expect: str | None = None, vae_path: Path | str | None = None) -> None:
    """Everything `load_checkpoint` checks before it reads tensor data, without building or reading anything: lets
    a caller that loads several files (base, refiner, VAE) refuse a bad one before the first of them loads."""
    vae_plan = inspect_vae(vae_path) if vae_path is not None else None
    if vae_plan is not None:
        _raise_if_invalid(vae_plan[2], vae_plan[0].path.name, "SDXL VAE")
    source, config, report = inspect_checkpoint(path, expect=expect, vae_config=vae_plan[1] if vae_plan else None)
    _raise_if_invalid(report, source.path.name, f"SDXL {config.kind} checkpoint")


def load_checkpoint(path: Path | str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    vae_path: Path | str | None = None, vae_dtype: torch.dtype | None = None,
                    expect: str | None = None, storage_dtype: torch.dtype | None = None, operations=None):
    """Load an SDXL base or refiner (single file or diffusers folder) as an `SDXLModel`, strictly validated, with
    every network read now (as diffusers' `from_pretrained`): any problem with the file surfaces here.

    `vae_path` replaces the checkpoint's VAE with a separate VAE file; `expect` ("base"/"refiner") refuses the other
    kind. Both files are validated from their headers before any tensor data is read. Raises a `CheckpointError`
    subclass with a self-explanatory message for anything it cannot load. `open_checkpoint` reads each network
    only when it is used instead; it also describes `storage_dtype` and `operations`.
    """
    model = open_checkpoint(path, dtype=dtype, device=device, vae_path=vae_path, vae_dtype=vae_dtype, expect=expect,
                            storage_dtype=storage_dtype, operations=operations)
    model.modules()  # read every network now
    return model


def open_checkpoint(path: Path | str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                    vae_path: Path | str | None = None, vae_dtype: torch.dtype | None = None,
                    expect: str | None = None, storage_dtype: torch.dtype | None = None, operations=None):
    """An `SDXLModel` backed by its checkpoint: validated now from the header(s), like `load_checkpoint`, but each
    network is read from the file the first time it is used and can be released again (`model.release(name)`).

    This is what a two-stage run wants: `generate` reads each stage's networks when the stage starts and releases
    them when it ends, so base and refiner never sit in memory whole at the same time. Broken tensor data (NaN/Inf
    weights, a file truncated since it was opened) is reported when the network is read.

    Precision: `dtype` (and `vae_dtype` for the VAE) is what the networks compute in; `storage_dtype` what their
    weights are held in. By default (None) a tensor stays in the file's precision wherever that converts exactly to
    the compute dtype (an fp16 or bf16 file computed in fp32, as on the CPU): the layers then cast their weights
    as they run (sdxl_core/operations.py), holding half the bytes for the same bits as fp32 weights. An
    explicit `storage_dtype` holds every weight in it (fp16/bf16 storage of an fp32 file rounds the weights).
    `operations` replaces the layer classes (e.g. ComfyUI's `comfy.ops.manual_cast`); by default plain torch.nn,
    or this package's manual casting where storage and compute differ.
    """
    from ..models.bundle import SDXLModel

    device = torch.device(device)
    dtype = _check_dtype(dtype if dtype is not None else default_dtype(device), "dtype")
    vae_dtype = _check_dtype(vae_dtype if vae_dtype is not None else default_vae_dtype(device), "vae_dtype")
    vae_plan = inspect_vae(vae_path) if vae_path is not None else None
    source = open_source(path)
    config, modules, report = _plan(source, expect, vae_plan[1] if vae_plan else None)
    _raise_if_invalid(report, source.path.name, f"SDXL {config.kind} checkpoint")
    if vae_plan is not None:
        _raise_if_invalid(vae_plan[2], vae_plan[0].path.name, "SDXL VAE")
    # Once per file, not at every read of a text encoder (a stage reads them again for each run).
    for name, prefix in component_prefixes(config.kind).items():
        if name.startswith("clip"):
            _note_position_ids(source, prefix, report)
    for note in report.notes:
        logger.warning("%s: %s", source.path.name, note)
    if storage_dtype is not None:
        _check_dtype(storage_dtype, "storage_dtype")
    reader = _ComponentReader(source, config, vae_plan[0] if vae_plan else None, dtype=dtype, vae_dtype=vae_dtype,
                              device=device, storage_dtype=storage_dtype, operations=operations)
    logger.info("opened %s: SDXL %s (%s, %s) as %s on %s%s", source.path.name, config.kind, source.format,
                source.layout, dtype, device, f", VAE from {vae_plan[0].path.name}" if vae_plan else "")
    return SDXLModel(config, source=source.path, dtype=dtype, reader=reader)


def storage_dtype_for(file_dtype: torch.dtype, compute: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype one weight is held in: `requested` when given; else the file's own where it converts exactly to
    `compute` and takes fewer bytes (fp16/bf16/fp8 for fp32 compute, fp8 for fp16/bf16), else `compute`."""
    if requested is not None:
        return requested
    smaller = file_dtype.itemsize < compute.itemsize
    fp8 = file_dtype.itemsize == 1 and file_dtype.is_floating_point
    exact = compute == torch.float32 or fp8  # fp32 holds every fp16/bf16 value; fp16 and bf16 every fp8 value
    return file_dtype if smaller and exact else compute


class _ComponentReader:
    """Builds one network of a validated checkpoint on the meta device and streams its tensors in (the reader an
    `open_checkpoint` model calls); holds only the headers, so keeping it costs no tensor memory."""

    def __init__(self, source: CheckpointSource, config: SDXLConfig, vae_source: CheckpointSource | None, *,
                 dtype: torch.dtype, vae_dtype: torch.dtype, device: torch.device,
                 storage_dtype: torch.dtype | None = None, operations=None):
        self.source, self.config, self.vae_source = source, config, vae_source
        self.dtype, self.vae_dtype, self.device = dtype, vae_dtype, device
        self.storage_dtype, self.operations = storage_dtype, operations
        self._plans: dict[str, tuple] = {}  # per network: derived from the headers, which never change

    def _plan(self, name: str):
        """(tensors, prefix, config, the keys to read, compute dtype, storage dtype of each floating key)."""
        if name not in self._plans:
            self._plans[name] = self._make_plan(name)
        return self._plans[name]

    def _make_plan(self, name: str):
        if name == "vae" and self.vae_source is not None:
            tensors, prefix, config = self.vae_source.tensors, VAE_PREFIX, self.config.vae
        else:
            tensors, prefix, config = self.source.tensors, component_prefixes(self.config.kind)[name], self.config
        bookkeeping = {prefix + key for key in BOOKKEEPING_KEYS.get(name, ())}
        keys = [key for key in tensors if key.startswith(prefix) and key not in bookkeeping]
        compute = self.vae_dtype if name == "vae" else self.dtype
        storage = {key: storage_dtype_for(tensors[key].dtype, compute, self.storage_dtype) for key in keys
                   if tensors[key].dtype.is_floating_point}
        return tensors, prefix, config, keys, compute, storage

    def weight_bytes(self, name: str) -> int:
        """What the network `name` will hold once read, from the header alone (for memory estimates)."""
        tensors, _, _, keys, _, storage = self._plan(name)
        return sum(tensors[key].numel * (storage[key] if key in storage else tensors[key].dtype).itemsize
                   for key in keys)

    def weight_elements(self, name: str) -> int:
        tensors, _, _, keys, _, _ = self._plan(name)
        return sum(tensors[key].numel for key in keys)

    def __call__(self, name: str) -> nn.Module:
        tensors, prefix, config, keys, compute, storage = self._plan(name)
        cast = any(held != compute for held in storage.values())
        operations = self.operations if self.operations is not None else (manual_cast if cast else None)
        module = build_component(name, config, operations=operations,
                                 compute_dtype=compute if operations is not None else None)
        _load_component(module, tensors, prefix, keys, dtype=compute, device=self.device, storage=storage)
        return module


def inspect_vae(path: Path | str | CheckpointSource) -> tuple[CheckpointSource, VAEConfig, ValidationReport]:
    """Identify and validate a separate VAE file or folder from its header(s) alone; raise if unusable."""
    source = path if isinstance(path, CheckpointSource) else open_source(path)
    name = source.path.name
    kind = source.identification.kind
    if kind in ("sdxl-base", "sdxl-refiner"):
        raise WrongComponentError(f"{name} is a full SDXL {kind.removeprefix('sdxl-')} checkpoint, not a VAE file; "
                                  "its own VAE is used when it is loaded as a checkpoint. Select a VAE file here.")
    if kind != "sdxl-vae":
        raise WrongComponentError(f"{name} is {source.identification.description}, not a VAE file. Select an SDXL "
                                  "VAE file (e.g. sdxl_vae.safetensors) here")
    config = infer_vae_config({k[len(VAE_PREFIX):]: s for k, s in source.shapes.items()}, source.hints)
    if config.latent_channels != _SDXL_LATENT_CHANNELS:
        raise WrongArchitectureError(f"{name} is a {config.latent_channels}-channel VAE (SD3/Flux use 16); SDXL "
                                     f"uses a {_SDXL_LATENT_CHANNELS}-channel VAE. Select an SDXL VAE (e.g. "
                                     "sdxl_vae.safetensors or the fp16-fix VAE)")
    module = build_component("vae", config)
    report = validate(source.shapes, expected_shapes({"vae": module}, {"vae": VAE_PREFIX}), {"vae": VAE_PREFIX})
    return source, config, report


def load_vae(path: Path | str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"):
    """Load a separate SDXL VAE (e.g. the fp16-fix VAE), original or diffusers names, as an `AutoencoderKL`.

    An SD 1.x VAE has exactly the SDXL VAE's tensor shapes, so no loader can tell the two apart from the file; it
    loads, and gives washed-out colours with SDXL latents.
    """
    device = torch.device(device)
    dtype = _check_dtype(dtype if dtype is not None else default_vae_dtype(device), "dtype")
    source, config, report = inspect_vae(path)
    _raise_if_invalid(report, source.path.name, "SDXL VAE")
    module = build_component("vae", config)
    _load_component(module, source.tensors, VAE_PREFIX, list(source.tensors), dtype=dtype, device=device)
    return module


def _lazy(tensor: torch.Tensor, dtype: torch.dtype | None) -> LazyTensor:
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return LazyTensor(shape=tuple(tensor.shape), dtype=target, origin="in memory",
                      loader=lambda: tensor.detach().to("cpu", target).contiguous())


def save_checkpoint(model, path: Path | str, dtype: torch.dtype | None = None) -> None:
    """Write an `SDXLModel` as an original-layout single-file .safetensors (the published key set), tensor by tensor.

    `dtype` casts every floating tensor (None keeps each one's dtype). The file's metadata records the facts that
    shapes cannot carry (head counts, GroupNorm groups), so `load_checkpoint` rebuilds exactly `model.config`.
    The file appears whole or not at all (sdxl_core/runtime/atomic_write.py), even when the write is interrupted.
    """
    if dtype is not None:
        _check_dtype(dtype, "dtype")
    config: SDXLConfig = model.config
    prefixes = component_prefixes(config.kind)
    entries: dict[str, LazyTensor] = {}
    for name, module in model.modules().items():
        for key, tensor in module.state_dict().items():
            entries[prefixes[name] + key] = _lazy(tensor, dtype)
    if "clip_l" in prefixes:
        ids = torch.arange(CLIP_CONTEXT_LENGTH, dtype=torch.int64).unsqueeze(0)
        entries[prefixes["clip_l"] + "text_model.embeddings.position_ids"] = _lazy(ids, None)
    logit_dtype = dtype or model.clip_g.hf_model.get_input_embeddings().weight.dtype
    entries[prefixes["clip_g"] + "logit_scale"] = _lazy(torch.tensor(_OPENCLIP_LOGIT_SCALE, dtype=logit_dtype), None)
    # The prediction type travels as ComfyUI's empty marker tensors, so ComfyUI reads the file the same way.
    if config.prediction == "v_prediction":
        entries[V_PRED_MARKER] = _lazy(torch.tensor([]), None)
        if config.noise_schedule.zsnr:
            entries[ZTSNR_MARKER] = _lazy(torch.tensor([]), None)
    elif config.noise_schedule.zsnr:
        raise ValueError("an eps-prediction model with a zero-terminal-SNR schedule has no marker ComfyUI reads; "
                         "save it as eps without zsnr, or as v_prediction")
    metadata = {**config_hints(config), "modelspec.architecture": _MODELSPEC[config.kind]}
    write_safetensors(path, entries, metadata)
