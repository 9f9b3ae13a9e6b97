"""Load SDXL ControlNets: the diffusers layout (a folder or a single `diffusion_pytorch_model.safetensors`) and the
original single-file layout (sgm/ComfyUI names, with or without `control_model.`), told apart by their keys.

Everything is decided from names and shapes before a byte of tensor data is read: the architecture (widths, depths,
context and ADM widths, hint-encoder stages) is read from the shapes, ControlNets for SD 1.x / 2.x and other kinds
of control files (control-LoRAs, multi-condition "union" models such as xinsir's controlnet-union-sdxl-1.0, T2I
adapters) are refused with a sentence, and the tensors then stream into a meta-built `ControlNetModel` one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..config import ControlNetConfig
from ..models.controlnet import ControlNetModel
from .detect import (
    DEFAULT_HEAD_WIDTH,
    DEFAULT_NORM_GROUPS,
    HINT_UNET_HEAD_CHANNELS,
    HINT_UNET_NORM_GROUPS,
    _hint,
    _indices,
    _need,
    infer_unet_config,
    top_level_summary,
)
from .diffusers_layout import _read_json, _unet_hints
from .errors import CheckpointNotFoundError, StateDictMismatchError, WrongArchitectureError, WrongComponentError
from .files import LazyTensor, read_header, read_sharded
from .loading import _check_dtype, _read_checked, default_dtype
from .unet_names import UNetNameTable

# The original release (lllyasviel/ControlNet, sgm) stores the network under this prefix; ComfyUI accepts both.
ORIGINAL_PREFIX = "control_model."
_DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
_ORIGINAL_MARKER = "input_hint_block.0.weight"
_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


def read_controlnet_tensors(path: Path | str) -> tuple[dict[str, LazyTensor], dict[str, str], str]:
    """(original-layout lazy tensors without prefix, hints, layout name) of a ControlNet file or folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        tensors, metadata, _ = read_sharded(path, _FOLDER_WEIGHTS, "ControlNet")
        hints = {**_unet_hints(_read_json(path / "config.json")), **metadata}
    elif path.exists():
        header = read_header(path)
        tensors, hints = dict(header.tensors), dict(header.metadata)
        # A lone diffusers file often sits next to its config.json, which holds the head width shapes cannot show.
        if _DIFFUSERS_MARKER in tensors:
            hints = {**_unet_hints(_read_json(path.parent / "config.json")), **hints}
    else:
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    shapes = {key: t.shape for key, t in tensors.items()}
    _refuse_other_kinds(path.name, shapes)
    if _DIFFUSERS_MARKER in tensors:
        return controlnet_from_diffusers(tensors), hints, "diffusers"
    if ORIGINAL_PREFIX + _ORIGINAL_MARKER in tensors:
        tensors = {key[len(ORIGINAL_PREFIX):]: t for key, t in tensors.items() if key.startswith(ORIGINAL_PREFIX)}
    return tensors, hints, "original"


def _refuse_other_kinds(name: str, shapes: Mapping[str, tuple]) -> None:
    keys = shapes.keys()
    if "lora_controlnet" in keys:  # the marker key of Stability's control-LoRA files (ComfyUI reads the same)
        raise WrongComponentError(f"{name} is a control-LoRA (a low-rank ControlNet delta for a base UNet), which "
                                  "these nodes do not load; use a full SDXL ControlNet file")
    if any(k.startswith(("task_embedding", "control_model.task_embedding", "control_add_embedding.",
                         "control_model.control_add_embedding.", "transformer_layes.")) for k in keys):
        # The union's fusion step cannot be run to one reference: its attention head count is not in the file,
        # and diffusers (ControlNetUnionModel) feeds the latent's mean to the fusion transformer as an extra token
        # where ComfyUI (cldm.union_controlnet_merge) does not, so the two give different residuals.
        raise WrongComponentError(f"{name} is a multi-condition \"union\" ControlNet (xinsir "
                                  "controlnet-union-sdxl-1.0 or its ProMax version), which sdxl_core does not run: "
                                  "diffusers and ComfyUI run its condition-fusion step differently, so there is no "
                                  "one result to match; use a single-condition SDXL ControlNet (canny, depth, ...), "
                                  "or ComfyUI's own ControlNet nodes for the union model")
    if _DIFFUSERS_MARKER in keys or _ORIGINAL_MARKER in keys or ORIGINAL_PREFIX + _ORIGINAL_MARKER in keys:
        return
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise WrongComponentError(f"{name} is a full diffusion checkpoint, not a ControlNet; load it as a checkpoint "
                                  "and give the ControlNet file here")
    if any(k.startswith(("adapter.", "body.0.")) for k in keys):
        raise WrongComponentError(f"{name} looks like a T2I adapter, which is not a ControlNet; these nodes load "
                                  "SDXL ControlNets")
    raise WrongComponentError(f"{name} is not a ControlNet: it has no hint encoder ({_DIFFUSERS_MARKER} or "
                              f"{_ORIGINAL_MARKER}); it holds {len(shapes)} tensors: {top_level_summary(shapes)}")


def controlnet_key_from_diffusers(key: str, encoder_names: UNetNameTable, hint_stages: int) -> str:
    """One diffusers ControlNetModel key -> its original name (the shared encoder part renamed as the UNet's)."""
    if m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(weight|bias)$", key):
        # conv_in is input_hint_block.0, blocks.i is 2(i+1), conv_out follows the last block.
        index = 0 if m[1] == "conv_in" else 2 * (2 * (hint_stages - 1) + 1) if m[1] == "conv_out" else \
            2 * (int(m[2]) + 1)
        return f"input_hint_block.{index}.{m[3]}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)$", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"controlnet_mid_block\.(weight|bias)$", key):
        return f"middle_block_out.0.{m[1]}"
    # The shared encoder part is named as the UNet's (checkpoints/unet_names.py); anything else passes through for
    # validation to name.
    return encoder_names.from_diffusers(key) or key


def controlnet_from_diffusers(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """diffusers ControlNetModel names -> original names; tensors stay lazy (names only)."""
    resnets = [int(m[1]) for key in tensors if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", key))]
    if not resnets:
        raise StateDictMismatchError("the diffusers ControlNet has no down_blocks.0.resnets: not a ControlNetModel")
    blocks = {int(m[1]) for key in tensors if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", key))}
    if len(blocks) % 2:
        raise StateDictMismatchError(f"the diffusers ControlNet's hint encoder has {len(blocks)} blocks; pairs of "
                                     "(same-width, downsampling) convolutions are expected")
    levels = 1 + max(int(m[1]) for key in tensors if (m := re.match(r"down_blocks\.(\d+)\.", key)))
    attention = [any(key.startswith(f"down_blocks.{level}.attentions.") for key in tensors) for level in range(levels)]
    names = UNetNameTable(max(resnets) + 1, attention)
    return {controlnet_key_from_diffusers(key, names, len(blocks) // 2 + 1): tensor for key, tensor in tensors.items()}


def infer_controlnet_config(shapes: Mapping[str, tuple], hints: Mapping[str, str], name: str = "the ControlNet"
                            ) -> ControlNetConfig:
    """The architecture from original-layout shapes; SD 1.x / 2.x ControlNets are refused here."""
    if "label_emb.0.0.weight" not in shapes:
        context = next((shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
        family = {768: "SD 1.x", 1024: "SD 2.x"}.get(context, "a model without SDXL's size/pooled-text embedding")
        raise WrongArchitectureError(f"{name} is a ControlNet for {family} ({context}-wide cross-attention, no ADM "
                                     "embedding); it cannot steer an SDXL UNet: use an SDXL ControlNet")
    # The encoder half has no output head; the UNet reader wants one, so its shape is stated (4 latent channels).
    with_head = dict(shapes)
    with_head["out.2.weight"] = (4, _need(shapes, "input_blocks.0.0.weight", "ControlNet", 4)[0], 3, 3)
    unet = infer_unet_config(with_head, {HINT_UNET_HEAD_CHANNELS: str(_hint(hints, HINT_UNET_HEAD_CHANNELS,
                                                                            DEFAULT_HEAD_WIDTH)),
                                         HINT_UNET_NORM_GROUPS: str(_hint(hints, HINT_UNET_NORM_GROUPS,
                                                                          DEFAULT_NORM_GROUPS))})
    convs = _indices({k: v for k, v in shapes.items() if k.endswith(".weight")}, "input_hint_block")
    if not convs or convs != list(range(0, 2 * len(convs), 2)) or len(convs) % 2:
        raise StateDictMismatchError(f"cannot read {name}'s hint encoder: convolutions at input_hint_block {convs}, "
                                     "expected 0, 2, 4, ... in (same-width, downsampling) pairs plus input and output")
    first = _need(shapes, "input_hint_block.0.weight", "ControlNet hint encoder", 4)
    widths = [first[0]] + [_need(shapes, f"input_hint_block.{i}.weight", "ControlNet hint encoder", 4)[0]
                           for i in convs[2:-1:2]]
    return ControlNetConfig(unet=unet, hint_channels=first[1], hint_block_channels=tuple(widths))


def _check_layout(model: ControlNetModel, tensors: Mapping[str, LazyTensor], name: str) -> None:
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    found = {key: tuple(t.shape) for key, t in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]!r}: {list(found[wrong[0]])} where "
                         f"{list(expected[wrong[0]])} was expected)")
        raise StateDictMismatchError(f"{name} does not have the layout of an SDXL ControlNet: {'; '.join(parts)}")


def inspect_controlnet(path: Path | str) -> tuple[ControlNetConfig, str]:
    """(architecture, layout) of a ControlNet file or folder, reading headers only."""
    tensors, hints, layout = read_controlnet_tensors(path)
    name = Path(path).name
    config = infer_controlnet_config({k: t.shape for k, t in tensors.items()}, hints, name)
    _check_layout(ControlNetModel(config, device="meta"), tensors, name)
    return config, layout


def load_controlnet(path: Path | str, *, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> ControlNetModel:
    """An SDXL ControlNet from a diffusers folder or file, or an original single file, ready to run.

    `dtype` defaults to the UNet's default for `device` (float16 on CUDA, float32 elsewhere)."""
    device = torch.device(device)
    dtype = _check_dtype(dtype if dtype is not None else default_dtype(device), "the ControlNet dtype")
    tensors, hints, _ = read_controlnet_tensors(path)
    name = Path(path).name
    config = infer_controlnet_config({k: t.shape for k, t in tensors.items()}, hints, name)
    model = ControlNetModel(config, device="meta")
    _check_layout(model, tensors, name)
    state = {key: _read_checked(lazy, key, dtype, device) for key, lazy in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()
