"""LoRA files for SDXL, merged into a copy of a loaded SDXL stage (Hu et al. 2021, "LoRA"; kohya sd-scripts layout).

A LoRA stores, per adapted layer, a low-rank pair `down` [r, in, (kh, kw)] and `up` [out, r, (1, 1)] and optionally
`alpha`; the layer's weight becomes W' = W + strength * (alpha / r) * (up @ down) (no alpha: scale 1), computed in
float32 and cast back to W's dtype. Conv layers take kohya's LoCon shape: a kxk `down` and a 1x1 `up`, so the
product is reshaped to W's [out, in, kh, kw].

Names. Our networks use the original (sgm / transformers / OpenCLIP) parameter layout, while SDXL LoRAs name layers
after diffusers' module paths:
- kohya / A1111: `lora_unet_<diffusers path with "." -> "_">` (e.g. `lora_unet_down_blocks_1_attentions_0_
  transformer_blocks_0_attn1_to_q` is our `input_blocks.4.1.transformer_blocks.0.attn1.to_q`), `lora_te1_` for
  CLIP-L and `lora_te2_` for bigG (transformers paths, `text_model_encoder_layers_0_self_attn_q_proj`), with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`. The sgm-named variant `lora_unet_input_blocks_4_1_...` is
  accepted too.
- diffusers / PEFT: `unet.<diffusers path>`, `text_encoder.<path>`, `text_encoder_2.<path>` with `.lora_A.weight` /
  `.lora_B.weight`, `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down/up.weight`, or the attention
  processor form `attn1.processor.to_q_lora.down.weight`.
The diffusers path of every UNet layer comes from the name table of `unet_names`, derived from the config (the same
table the diffusers-folder reader uses). In memory bigG keeps separate q/k/v projections (transformers' CLIP; the
fused OpenCLIP `in_proj_weight` exists only in the single-file state dict), so a bigG q/k/v LoRA patches one
projection: in the single-file layout that is the row slice [0:d], [d:2d] or [2d:3d] of `in_proj_weight`.

Every layer in the file must land on a parameter of the model with fitting shapes, or the file is refused with a
sentence naming unmatched layers: nothing is applied partially. LyCORIS LoHa/LoKr, DoRA, Tucker-decomposed LoCon,
SD 1.x/2.x LoRAs, a base LoRA on the refiner and checkpoints are refused by name.

Memory: `apply_lora` never modifies the given model (loaders cache it and other graph branches share it). It
returns a new SDXLModel whose networks are rebuilt on the meta device and adopt the original tensors: every tensor
the LoRA does not touch is shared (same storage), and each patched weight is one new tensor of the weight's size
and dtype, so the extra memory is the size of the patched weights, plus one float32 buffer of the largest single
weight while merging. A typical kohya SDXL LoRA adapts all 722 attention and feed-forward layers of the UNet, which
hold 86% of its weights: 4.1 GiB of new fp16 tensors next to the 4.8 GiB UNet, plus about 1.4 GiB when it also
adapts both text encoders. A network the LoRA does not touch (the VAE always; the text encoders at strength_clip 0)
is the same object in both models. Sharing lasts while both models stay put: a host that moves networks with
`.to()` (ComfyUI's model management, when it loads the LoRA'd model onto the GPU and offloads it again) gives the
copy its own host tensors on the way back, so from then on it also holds its unpatched weights (about 0.7 GiB of
the UNet for the typical LoRA above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import UNetConfig
from ..models.bundle import SDXLModel
from ..models.unet import UNetModel
from ..runtime.optimize import is_compiled, is_qkv_fused
from ..text.encoders import TextEncoder
from .detect import identify
from .files import read_header
from .unet_names import UNetNameTable


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this SDXL model; the message says why and what to use instead."""


# ---------------------------------------------------------------------------------------------------------------
# Layer names: every name a LoRA file may use for one of our layers


def unet_diffusers_names(config: UNetConfig, module_paths: list[str]) -> dict[str, str]:
    """Our UNet module path -> diffusers' UNet2DConditionModel module path, for the given (Linear/Conv) paths."""
    table = UNetNameTable.for_config(config)
    names = {}
    for path in module_paths:
        name = table.to_diffusers(path)
        if name is None:
            raise LookupError(f"UNet layer {path!r} has no diffusers name (no block of this UNet holds it)")
        names[path] = name
    return names


@dataclass(frozen=True)
class _Target:
    component: str  # "unet", "clip_l" or "clip_g"
    parameter: str  # the weight's name in that network's named_parameters()
    shape: tuple[int, ...]


def _adaptable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(path, layer) for path, layer in module.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]


def _text_layer_paths(encoder: TextEncoder) -> dict[str, str]:
    """transformers' canonical module path (`text_model.encoder.layers.0.self_attn.q_proj`, `text_projection`) ->
    our module path, whatever nesting the installed transformers uses."""
    inner = encoder.hf_model
    text_root = getattr(inner, "text_model", None)
    paths = {}
    for path, _ in _adaptable_layers(inner):
        if text_root is not None:
            canonical = path  # already `text_model.*` or `text_projection`
        else:
            canonical = path if path == "text_projection" else f"text_model.{path}"
        paths[canonical] = f"hf_model.{path}"
    return paths


def lora_targets(model: SDXLModel) -> dict[str, _Target]:
    """Every layer name a LoRA file may use for `model` (kohya and diffusers spellings) -> the weight it adapts."""
    targets: dict[str, _Target] = {}
    unet_layers = dict(_adaptable_layers(model.unet))
    diffusers = unet_diffusers_names(model.unet.config, list(unet_layers))
    for path, layer in unet_layers.items():
        target = _Target("unet", f"{path}.weight", tuple(layer.weight.shape))
        for name in (path, diffusers[path]):
            targets["lora_unet_" + name.replace(".", "_")] = target
        targets["unet." + diffusers[path]] = target
        targets[diffusers[path]] = target  # bare diffusers / PEFT names
    # The base's CLIP-L is text encoder 1 and bigG text encoder 2 (kohya te1/te2, diffusers text_encoder(_2));
    # the refiner's only encoder, bigG, is "the" text encoder (kohya lora_te_, diffusers text_encoder.).
    if model.clip_l is not None:
        encoders = [("clip_l", model.clip_l, "lora_te1_", "text_encoder."),
                    ("clip_g", model.clip_g, "lora_te2_", "text_encoder_2.")]
    else:
        encoders = [("clip_g", model.clip_g, "lora_te_", "text_encoder.")]
    for component, encoder, kohya, diffusers_prefix in encoders:
        layers = dict(encoder.named_modules())
        for canonical, path in _text_layer_paths(encoder).items():
            target = _Target(component, f"{path}.weight", tuple(layers[path].weight.shape))
            targets[kohya + canonical.replace(".", "_")] = target
            targets[diffusers_prefix + canonical] = target
    return targets


# ---------------------------------------------------------------------------------------------------------------
# Reading a LoRA file


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer of a LoRA file: its low-rank pair and optional alpha, under the file's layer name."""

    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank (kohya's convention); 1 when the file stores no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


# Tensor-name endings of the LoRA formats we apply: ending -> role. Longest first (".lora.down.weight" before
# ".down.weight").
_ROLES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
# diffusers' attention-processor LoRA: `attn1.processor.to_q_lora.down.weight` adapts `attn1.to_q`.
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
# Adapter kinds this loader does not merge, told from their tensor names.
_FOREIGN_KINDS = (
    (".hada_", "a LyCORIS LoHa (Hadamard-product) adapter"),
    (".lokr_", "a LyCORIS LoKr (Kronecker-product) adapter"),
    (".dora_scale", "a DoRA (weight-decomposed LoRA) adapter"),
    (".lora_mid.", "a LyCORIS LoCon with a Tucker-decomposed middle tensor"),
    (".oft_", "an OFT (orthogonal fine-tuning) adapter"),
)


def _show(names, limit: int = 4, quote: bool = True) -> str:
    names = list(names)
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_lora_file(path: Path | str):
    """The header of a LoRA .safetensors file, read without its tensor data; refuses, in a sentence, a file that is
    a checkpoint instead (and, through `read_header`, pickles, truncated and damaged files)."""
    path = Path(path)
    header = read_header(path)
    shapes = {name: lazy.shape for name, lazy in header.tensors.items()}
    if not any(_role(key) for key in shapes) and not _foreign_kind(shapes):
        found = identify(shapes)
        raise LoRAError(f"{path.name} is {found.description}, not a LoRA: load checkpoints with the SDXL checkpoint "
                        "loader and put LoRA files (with lora_down/lora_up or lora_A/lora_B tensors) in "
                        "models/loras")
    return header


def read_lora_file(path: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA .safetensors file; refuses, in a sentence, a file that is a checkpoint instead."""
    return {name: lazy.read() for name, lazy in check_lora_file(path).tensors.items()}


def _foreign_kind(keys) -> str | None:
    for marker, what in _FOREIGN_KINDS:
        if any(marker in key for key in keys):
            return what
    return None


def _role(key: str) -> tuple[str, str] | None:
    """(layer name, "down" | "up" | "alpha") of one LoRA tensor name, or None for any other tensor."""
    processor = _PROCESSOR.match(key)
    if processor:
        layer, projection, role = processor.groups()
        return f"{layer}.{'to_out.0' if projection == 'to_out' else projection}", role
    for ending, role in _ROLES:
        if key.endswith(ending):
            return key[:-len(ending)], role
    return None


def parse_lora(state_dict: Mapping[str, torch.Tensor], name: str = "the LoRA") -> list[LoRALayer]:
    """Group a LoRA state dict into layers; refuse other adapter kinds and tensors that belong to no LoRA pair."""
    foreign = _foreign_kind(state_dict)
    if foreign is not None:
        raise LoRAError(f"{name} is {foreign}, which this loader does not apply (it merges plain LoRA/LoCon "
                        "low-rank pairs only); use a standard SDXL LoRA")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, tensor in state_dict.items():
        found = _role(key)
        if found is None:
            stray.append(key)
            continue
        layer, role = found
        if role in parts.setdefault(layer, {}):
            raise LoRAError(f"{name} holds the {role} tensor of layer {layer!r} twice (under two spellings)")
        parts[layer][role] = tensor
    if stray:
        raise LoRAError(f"{name} holds {len(stray)} tensor(s) that are not LoRA down/up/alpha weights: "
                        f"{_show(stray)}; full-weight differences and other adapter kinds are not applied")
    layers = []
    for layer, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "down" if "down" not in roles else "up"
            raise LoRAError(f"{name} is incomplete: layer {layer!r} has no {missing} tensor (a damaged file?)")
        alpha = roles.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoRAError(f"{name}: the alpha of layer {layer!r} has {alpha.numel()} values, a scalar is expected")
        layers.append(LoRALayer(layer, roles["up"], roles["down"], None if alpha is None else float(alpha)))
    if not layers:
        raise LoRAError(f"{name} holds no LoRA layers")
    return layers


# ---------------------------------------------------------------------------------------------------------------
# Matching layers to the model


def _fits(layer: LoRALayer, shape: tuple[int, ...]) -> bool:
    """down [r, in, *k] with k = the weight's kernel (or 1x1 for a Linear), up [out, r, 1, ...]."""
    up, down = layer.up.shape, layer.down.shape
    if len(up) < 2 or len(down) < 2 or up[1] != down[0] or up[0] != shape[0] or down[1] != shape[1]:
        return False
    if any(d != 1 for d in up[2:]):
        return False
    kernel = tuple(down[2:])
    return kernel == tuple(shape[2:]) or (not shape[2:] and all(d == 1 for d in kernel))


def _sd1_evidence(layers: list[LoRALayer], model: SDXLModel) -> str | None:
    """Why these layers look like an SD 1.x/2.x LoRA (their UNet/text encoders differ from SDXL's), or None."""
    names = [layer.name for layer in layers]
    if model.clip_l is not None and any(n.startswith("lora_te_") for n in names):
        return "it adapts a single text encoder (lora_te_*) where SDXL has two (lora_te1_*, lora_te2_*)"
    # SD 1.x/2.x have attention at the first UNet level, SDXL does not.
    first_level = ("down_blocks_0_attentions", "down_blocks.0.attentions", "up_blocks_3_attentions",
                   "up_blocks.3.attentions", "input_blocks_1_1_")
    if model.config.unet.transformer_depth[0] == 0 and any(marker in n for n in names for marker in first_level):
        return "it adapts attention layers at the first UNet level, which SDXL does not have"
    for layer in layers:
        if re.search(r"attn2[._]to_[kv]$", layer.name) and layer.down.shape[1] in (768, 1024) \
                and layer.down.shape[1] != model.config.unet.context_dim:
            return f"its UNet cross-attention reads {layer.down.shape[1]}-wide text (SD 1.x: 768, SD 2.x: 1024)"
    return None


def match_lora(layers: list[LoRALayer], model: SDXLModel, name: str = "the LoRA") -> list[tuple[LoRALayer, _Target]]:
    """Pair every LoRA layer with the weight it adapts, or refuse the whole file with the reason."""
    targets = lora_targets(model)
    matched, unmatched, misfit = [], [], []
    for layer in layers:
        target = targets.get(layer.name)
        if target is None:
            unmatched.append(layer.name)
        elif not _fits(layer, target.shape):
            misfit.append(f"{layer.name!r} (up {list(layer.up.shape)}, down {list(layer.down.shape)} for a weight "
                          f"{list(target.shape)})")
        else:
            matched.append((layer, target))
    if not unmatched and not misfit:
        seen: dict[tuple[str, str], str] = {}
        for layer, target in matched:
            other = seen.setdefault((target.component, target.parameter), layer.name)
            if other != layer.name:
                raise LoRAError(f"{name} adapts the same weight twice, as {other!r} and {layer.name!r}")
        return matched
    sd1 = _sd1_evidence(layers, model)
    if sd1 is not None:
        raise LoRAError(f"{name} is an SD 1.x/2.x LoRA, not an SDXL one: {sd1}. Its layers do not fit SDXL; "
                        "use a LoRA trained for SDXL")
    if model.kind == "refiner":
        raise LoRAError(f"{name} does not fit the SDXL refiner ({len(unmatched) + len(misfit)} of its "
                        f"{len(layers)} layers, e.g. {_show(unmatched + misfit, 2, quote=False)}). SDXL LoRAs are "
                        "trained for the base model, whose layers differ from the refiner's: apply it to the base "
                        "model")
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} layer name(s) match no layer of this SDXL {model.kind}: "
                        f"{_show(unmatched)}")
    if misfit:
        problems.append(f"{len(misfit)} layer(s) have shapes that do not fit: {_show(misfit, 3, quote=False)}")
    raise LoRAError(f"{name} does not fit this SDXL {model.kind} model, so none of it was applied: "
                    + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Merging


def merged_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, factor: float, *,
                  device: torch.device | str | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """W + factor * (up @ down), in float32, as a new tensor of W's dtype, device and memory format.

    `factor` is strength * alpha / rank; a kohya LoCon conv pair (kxk down, 1x1 up) is multiplied flattened and
    reshaped to W's [out, in, kh, kw]. `device` is where to compute (default: where W lives); `scratch`, a float32
    buffer there of at least W's size, holds the float32 sum, so merging many weights reuses one allocation."""
    device = weight.device if device is None else torch.device(device)
    up32 = up.to(device=device, dtype=torch.float32).reshape(up.shape[0], -1)
    down32 = down.to(device=device, dtype=torch.float32).reshape(down.shape[0], -1)
    # A float32 copy of W (never W itself, even when W is float32), then one fused multiply-add into it.
    if scratch is None:
        merged = weight.to(device=device, dtype=torch.float32, copy=True).reshape(weight.shape[0], -1)
    else:
        if scratch.dtype != torch.float32 or scratch.device != device or scratch.numel() < weight.numel():
            raise ValueError(f"scratch must be a float32 buffer on {device} of at least {weight.numel()} elements, "
                             f"got {scratch.numel()} {scratch.dtype} on {scratch.device}")
        merged = scratch[:weight.numel()].view(weight.shape[0], -1)
        merged.copy_(weight.reshape(weight.shape[0], -1))
    merged.addmm_(up32, down32, alpha=factor)
    out = torch.empty_like(weight)
    out.copy_(merged.view(weight.shape))
    return out


def _rebuilt(network: nn.Module, weights: Mapping[str, torch.Tensor], storage: torch.device | None = None
             ) -> nn.Module:
    """A new network of the same architecture holding the same tensors as `network`, except `weights` (by name).

    Built on the meta device (nothing allocated, nothing initialised); new Parameter objects wrap the shared
    storages, so moving or casting one network in place (`.to`) leaves the other as it was. With `storage`, every
    tensor of the copy lives there: shared where the original's already does, copied where it does not."""
    layers = {"operations": network.operations, "compute_dtype": network.compute_dtype}  # storage apart from compute
    if isinstance(network, UNetModel):
        copy = UNetModel(network.config, device="meta", **layers)
    elif isinstance(network, TextEncoder):
        copy = TextEncoder(network.config, device="meta", **layers)
    else:
        raise TypeError(f"LoRA patches UNetModel and TextEncoder networks, got {type(network).__name__}")
    originals = dict(network.named_parameters())
    if set(originals) != {n for n, _ in copy.named_parameters()}:
        raise LoRAError(f"this {type(network).__name__} has been restructured (e.g. fused q/k/v projections) and "
                        "can no longer take a LoRA: apply LoRAs to the model as loaded, before optimising it")
    owners = dict(copy.named_modules())
    for name, parameter in originals.items():
        owner, _, leaf = name.rpartition(".")
        data = weights.get(name, parameter.detach())
        if storage is not None:
            data = data.to(storage)
        owners[owner]._parameters[leaf] = nn.Parameter(data, requires_grad=parameter.requires_grad)
    for name, buffer in network.named_buffers():
        owner, _, leaf = name.rpartition(".")
        owners[owner]._buffers[leaf] = buffer if storage is None else buffer.to(storage)
    for (_, source), (_, target) in zip(network.named_modules(), copy.named_modules()):
        target.training = source.training
    return copy


def _resolved(device: torch.device | str) -> torch.device:
    """The device tensors on it report (`cuda` -> `cuda:0`), so comparisons with `tensor.device` hold."""
    return torch.empty(0, device=device).device


def apply_lora(model: SDXLModel, lora: Mapping[str, torch.Tensor] | Path | str, strength_model: float = 1.0,
               strength_clip: float = 1.0, *, name: str | None = None,
               device: torch.device | str | None = None, storage: torch.device | str | None = None) -> SDXLModel:
    """A new SDXLModel with the LoRA merged in: W + strength * alpha/rank * up @ down (kohya sd-scripts, ComfyUI
    `LoraLoader`); the UNet takes `strength_model`, the text encoders `strength_clip`.

    `lora` is a LoRA .safetensors file or its state dict. `model` is never modified; untouched tensors are shared
    (see the module docstring for the memory cost). The whole file is validated even for a zero strength; with
    both strengths 0 the given model itself is returned. `device` is where the merge is computed (e.g. the GPU
    while the weights wait in system RAM: each weight makes the round trip); by default where each weight lives.
    `storage` is where the new model's tensors live (e.g. the offload device of a host that moves networks itself:
    a copy built from weights that happen to sit on the GPU would otherwise hold GPU memory behind the host's
    back); by default each stays where the original's is."""
    read_for_this = set(model.component_names) - set(model.resident_components())  # before anything reads one
    if isinstance(lora, (str, Path)):
        name = name or Path(lora).name
        lora = read_lora_file(lora)
    name = name or "the LoRA"
    for label, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
        if not math.isfinite(value):
            raise LoRAError(f"{label} must be a finite number, got {value}")
    if is_compiled(model.unet):
        raise LoRAError("this UNet has been compiled (torch.compile) for speed, and a merged copy would quietly "
                        "run uncompiled: apply LoRAs to the model as loaded, then optimise it")
    if is_qkv_fused(model.unet):
        raise LoRAError("this UNet's q/k/v projections have been fused for speed, so LoRA layers no longer find "
                        "them: apply LoRAs to the model as loaded, then optimise it")
    matched = match_lora(parse_lora(lora, name), model, name)
    strengths = {"unet": float(strength_model), "clip_l": float(strength_clip), "clip_g": float(strength_clip)}
    networks = {name: model.component(name) for name in model.component_names if name != "vae"}  # not the VAE
    work = [(layer, target, networks[target.component].get_parameter(target.parameter))
            for layer, target in matched if strengths[target.component] != 0.0]
    patched: dict[str, dict[str, torch.Tensor]] = {}
    scratch: dict[torch.device, torch.Tensor] = {}  # one float32 buffer per device, sized for the largest weight
    compute = None if device is None else _resolved(device)
    storage = None if storage is None else _resolved(storage)
    for _, _, weight in work:
        where = weight.device if compute is None else compute
        if weight.numel() > scratch.get(where, torch.empty(0)).numel():
            scratch[where] = torch.empty(weight.numel(), dtype=torch.float32, device=where)
    with torch.no_grad():
        for layer, target, weight in work:
            where = weight.device if compute is None else compute
            merged = merged_weight(weight, layer.up, layer.down, strengths[target.component] * layer.scale,
                                   device=where, scratch=scratch[where])
            # Straight to where the copy lives, so merged weights never pile up on the compute device.
            patched.setdefault(target.component, {})[target.parameter] = (
                merged if storage is None else merged.to(storage))
    scratch.clear()
    replaced = {component: _rebuilt(networks[component], weights, storage)
                for component, weights in patched.items()}
    merged = model.replace(**replaced) if replaced else model
    # What was read from a checkpoint for this merge goes back where it is not the merged result: the given model
    # keeps its networks unread, as it came, and the merged one reads its unpatched networks when their step comes
    # (sdxl_core/runtime/stages.py) instead of holding them through every step before it.
    for holder, keep in ((model, set()), (merged, set(replaced))):
        for component in read_for_this - keep:
            if holder.can_release(component) and holder.is_resident(component):
                holder.release(component)
    return merged
