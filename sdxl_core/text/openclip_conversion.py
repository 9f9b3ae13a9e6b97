"""Key conversion between OpenCLIP text-tower names (as stored in SDXL single files) and transformers' CLIP names.

The mapping is the one diffusers' `convert_open_clip_checkpoint` and ComfyUI's `clip_text_transformers_convert`
apply: fused `attn.in_proj_*` rows are q | k | v, `text_projection` is stored as P for `x @ P` while a Linear keeps
`P.T`, and `logit_scale` (the contrastive temperature) plays no part in text encoding.

OpenCLIP side: keys as found after stripping `conditioner.embedders.N.model.`.
transformers side: the `CLIPTextModelWithProjection` layout (`text_model.*` + `text_projection.weight`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# Present in the checkpoints but not weights of the text encoder; dropped on conversion.
OPENCLIP_BOOKKEEPING_KEYS = frozenset({"logit_scale"})
# transformers < 5 stored the position ids as a persistent buffer; a value, not a weight.
TRANSFORMERS_BOOKKEEPING_KEYS = frozenset({"text_model.embeddings.position_ids"})

_OPENCLIP_TEXT_PROJECTION = "text_projection"
_TRANSFORMERS_TEXT_PROJECTION = "text_projection.weight"

_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_IN_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Fused attention input projection: OpenCLIP name -> parameter kind of the separate q/k/v Linears.
_IN_PROJ = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q", "k", "v")

_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_TRANSFORMERS_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_TRANSFORMERS_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")

_TOP_LEVEL_INVERSE = {v: k for k, v in _TOP_LEVEL.items()}
_IN_LAYER_INVERSE = {v: k for k, v in _IN_LAYER.items()}
_IN_PROJ_INVERSE = {v: k for k, v in _IN_PROJ.items()}


def openclip_key_to_transformers(key: str) -> tuple[str, ...]:
    """transformers names for one OpenCLIP text key (three for a fused in_proj); () for a bookkeeping key."""
    if key in OPENCLIP_BOOKKEEPING_KEYS:
        return ()
    if key == _OPENCLIP_TEXT_PROJECTION:
        return (_TRANSFORMERS_TEXT_PROJECTION,)
    if key in _TOP_LEVEL:
        return (_TOP_LEVEL[key],)
    match = _OPENCLIP_LAYER.match(key)
    if match:
        layer, rest = match.groups()
        prefix = f"text_model.encoder.layers.{layer}."
        if rest in _IN_LAYER:
            return (prefix + _IN_LAYER[rest],)
        if rest in _IN_PROJ:
            return tuple(f"{prefix}self_attn.{p}_proj.{_IN_PROJ[rest]}" for p in _QKV)
    raise KeyError(f"{key!r} is not an OpenCLIP text-encoder key (expected e.g. 'token_embedding.weight', "
                   "'transformer.resblocks.0.attn.in_proj_weight', 'ln_final.weight', 'text_projection')")


def transformers_key_to_openclip(key: str) -> str:
    """The OpenCLIP name holding one transformers text key (q/k/v all map to the fused in_proj)."""
    if key == _TRANSFORMERS_TEXT_PROJECTION:
        return _OPENCLIP_TEXT_PROJECTION
    if key in _TOP_LEVEL_INVERSE:
        return _TOP_LEVEL_INVERSE[key]
    match = _TRANSFORMERS_LAYER.match(key)
    if match:
        layer, rest = match.groups()
        prefix = f"transformer.resblocks.{layer}."
        if rest in _IN_LAYER_INVERSE:
            return prefix + _IN_LAYER_INVERSE[rest]
        qkv = _TRANSFORMERS_QKV.match(rest)
        if qkv:
            return prefix + _IN_PROJ_INVERSE[qkv.group(2)]
    raise KeyError(f"{key!r} is not a transformers CLIPTextModelWithProjection key (expected e.g. "
                   "'text_model.embeddings.token_embedding.weight', "
                   "'text_model.encoder.layers.0.self_attn.q_proj.weight', 'text_projection.weight')")


def openclip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower → `CLIPTextModelWithProjection` state dict (diffusers `convert_open_clip_checkpoint`)."""
    _reject_unknown(state_dict, openclip_key_to_transformers)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        names = openclip_key_to_transformers(key)
        if not names:
            continue
        if key == _OPENCLIP_TEXT_PROJECTION:
            converted[names[0]] = value.t().contiguous()
        elif len(names) == 3:
            if value.shape[0] % 3:
                raise ValueError(f"{key} has {value.shape[0]} rows; a fused q|k|v projection needs a multiple of 3")
            # Clones, so loading with assign=True never aliases the caller's fused tensor.
            for name, part in zip(names, value.chunk(3, dim=0)):
                converted[name] = part.clone()
        else:
            converted[names[0]] = value
    return converted


def transformers_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`CLIPTextModelWithProjection` state dict → OpenCLIP text-tower names (the inverse of the above)."""
    weights = {k: v for k, v in state_dict.items() if k not in TRANSFORMERS_BOOKKEEPING_KEYS}
    _reject_unknown(weights, transformers_key_to_openclip)
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        name = transformers_key_to_openclip(key)
        if key == _TRANSFORMERS_TEXT_PROJECTION:
            converted[name] = value.t().contiguous()
        elif name.endswith(tuple(_IN_PROJ)):
            part = _TRANSFORMERS_QKV.match(_TRANSFORMERS_LAYER.match(key).group(2)).group(1)
            fused.setdefault(name, {})[part] = value
        else:
            converted[name] = value
    for name, parts in fused.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{name} needs q, k and v projections; found only {sorted(parts)}")
        converted[name] = torch.cat([parts[p] for p in _QKV], dim=0)
    return converted


def _reject_unknown(state_dict: Mapping[str, torch.Tensor], key_map) -> None:
    unknown = []
    for key in state_dict:
        try:
            key_map(key)
        except KeyError:
            unknown.append(key)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise KeyError(f"{len(unknown)} key(s) are not text-encoder weights: {shown}{more}. "
                       "Strip the checkpoint prefix (e.g. 'conditioner.embedders.1.model.') before converting.")
