"""This core's networks built around tensors another runtime already holds, so both run on one copy of the weights.

A host such as ComfyUI keeps its own loaded SDXL networks (its ModelPatcher applies LoRAs and moves them between
devices). To run our samplers, text encoders or VAE code on those weights, each network is built on the meta device
(no memory, no initialisation) and given the host's tensors themselves as its parameters: the very `nn.Parameter`
objects, so a device move the host makes in place (`param.data = ...`, what `nn.Module.to` does) is seen by both,
and nothing is copied. The same works the other way, handing our tensors to the host's modules.

The names are the single-file (ldm/sgm) layout on both sides for the UNet and the VAE (ComfyUI's `diffusion_model`
and `first_stage_model` keep the checkpoint's names, and so do ours). The text encoders are transformers-named on
both sides (ComfyUI's `clip_model.CLIPTextModel` mirrors transformers' CLIP), up to where the installed transformers
puts the text transformer (`text_model.` or flattened; see text/encoders.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..config import TextEncoderConfig
from .errors import StateDictMismatchError

# The transformers-named text encoder's own level; the projection sits next to it.
_TEXT_MODEL = "text_model."
_INNER = "hf_model."


def tensor_slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(full name, owning module, attribute, is a parameter) of every parameter and persistent buffer, once."""
    for owner_name, owner in module.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for leaf, value in owner._parameters.items():
            if value is not None:
                yield prefix + leaf, owner, leaf, True
        for leaf, value in owner._buffers.items():
            if value is not None and leaf not in owner._non_persistent_buffers_set:
                yield prefix + leaf, owner, leaf, False


def adopt_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Install `tensors` (by `module`'s own names) as `module`'s parameters and persistent buffers, in place.

    Every slot must be given a tensor of its shape and every given tensor must have a slot, or nothing is changed
    and a StateDictMismatchError names the differences. `nn.Parameter` objects are installed as they are (shared
    with their owner); other tensors become non-trainable parameters around the same storage. Non-persistent
    buffers (bookkeeping such as CLIP's position ids) are left as they were built."""
    slots = {name: (owner, leaf, is_param) for name, owner, leaf, is_param in tensor_slots(module)}
    missing = sorted(set(slots) - set(tensors))
    unexpected = sorted(set(tensors) - set(slots))
    wrong = [f"{name} {tuple(tensors[name].shape)} vs {tuple(getattr(owner, leaf).shape)}"
             for name, (owner, leaf, _) in slots.items()
             if name in tensors and tuple(tensors[name].shape) != tuple(getattr(owner, leaf).shape)]
    if missing or unexpected or wrong:
        details = "; ".join(part for part in (
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shapes differ: {wrong[:5]}" if wrong else "") if part)
        raise StateDictMismatchError(f"the {what} does not have the layout this core builds for it ({details})")
    for name, (owner, leaf, is_param) in slots.items():
        tensor = tensors[name]
        if is_param:
            owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else \
                nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    return module


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter (the `nn.Parameter` objects themselves) and persistent buffer of `module`, by name."""
    return {name: getattr(owner, leaf) for name, owner, leaf, _ in tensor_slots(module)}


def text_encoder_name(encoder: nn.Module, transformers_name: str) -> str:
    """A transformers CLIP parameter name (`text_model.encoder.layers.0.mlp.fc1.weight`, `text_projection.weight`)
    -> the name of the same tensor in our `TextEncoder` (`hf_model.` + the installed transformers' layout)."""
    if transformers_name.startswith(_TEXT_MODEL):
        return _INNER + encoder._hf_text_prefix + transformers_name[len(_TEXT_MODEL):]
    return _INNER + transformers_name


def transformers_name(encoder: nn.Module, name: str) -> str:
    """The inverse of `text_encoder_name`: our TextEncoder's parameter name -> the transformers CLIP name."""
    inner = name.removeprefix(_INNER)
    if encoder._hf_text_prefix and inner.startswith(encoder._hf_text_prefix):
        return inner
    if inner.startswith("text_projection."):
        return inner
    return _TEXT_MODEL + inner


def text_encoder_config(shapes: Mapping[str, tuple], *, num_heads: int, hidden_act: str,
                        context_layer: int = -2) -> TextEncoderConfig:
    """A CLIP text encoder's config from transformers-named shapes (keys `text_model.*`, `text_projection.weight`)
    and the two facts shapes cannot carry: the head count and the activation."""
    def need(key: str) -> tuple:
        if key not in shapes:
            raise StateDictMismatchError(f"a CLIP text encoder has {key}; this one does not")
        return tuple(shapes[key])

    vocab, hidden = need("text_model.embeddings.token_embedding.weight")
    layers = {int(key.split(".")[3]) for key in shapes if key.startswith("text_model.encoder.layers.")}
    projection = shapes.get("text_projection.weight")
    return TextEncoderConfig(
        hidden_size=hidden, num_layers=len(layers), num_heads=int(num_heads),
        intermediate_size=need("text_model.encoder.layers.0.mlp.fc1.weight")[0], hidden_act=hidden_act,
        projection_dim=None if projection is None else int(projection[0]), vocab_size=vocab,
        max_position_embeddings=need("text_model.embeddings.position_embedding.weight")[0],
        context_layer=context_layer)


def stage_config_for(kind: str, *, unet=None, clip_g: TextEncoderConfig | None = None,
                     clip_l: TextEncoderConfig | None = None, vae=None, prediction: str = "eps",
                     zsnr: bool = False):
    """The SDXLConfig of a stage of which a host holds only some networks (ComfyUI keeps the UNet in MODEL and the
    text encoders in CLIP): the given parts, completed by the published SDXL stage (or this core's tiny test stage)
    of that kind whose widths they fit. The completed parts describe networks this core will not build; they make
    the config whole (its width checks, the wrong-stage hints)."""
    import dataclasses

    from ..config import SDXL_BASE, SDXL_REFINER, TINY_BASE, TINY_REFINER, SDXLConfig

    given = {name: part for name, part in (("unet", unet), ("clip_g", clip_g), ("clip_l", clip_l), ("vae", vae))
             if part is not None}
    for preset in (SDXL_BASE, TINY_BASE) if kind == "base" else (SDXL_REFINER, TINY_REFINER):
        parts = {"unet": preset.unet, "clip_g": preset.clip_g, "clip_l": preset.clip_l, "vae": preset.vae, **given}
        schedule = dataclasses.replace(preset.noise_schedule, zsnr=bool(zsnr))
        try:
            return SDXLConfig(kind=kind, adm_scalars=preset.adm_scalars, prediction=prediction,
                              noise_schedule=schedule, **parts)
        except ValueError:
            continue
    widths = ", ".join(f"{name} {getattr(part, 'context_dim', getattr(part, 'hidden_size', '?'))} wide"
                       for name, part in given.items() if name != "vae")
    raise StateDictMismatchError(f"these networks ({widths}) do not form an SDXL {kind}: its text encoders give "
                                 f"{'2048' if kind == 'base' else '1280'}-wide text embeddings and a 1280-wide "
                                 "pooled vector")
