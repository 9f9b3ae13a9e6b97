"""diffusers-layout weights -> the original (sgm/ldm) single-file layout, tensor by tensor and lazily.

The reverse of diffusers `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_open_clip_checkpoint` (docs/checkpoints.md#diffusers-folders), written as name rules (the UNet's through
the table in `unet_names`, which LoRA matching shares) so that a diffusers folder or a diffusers-layout VAE file
streams through the same loader as a single-file checkpoint. Every mapped
tensor stays a `LazyTensor`: nothing is read until the loader asks for it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .detect import (
    BASE_CLIP_G_PREFIX,
    BASE_CLIP_L_PREFIX,
    HINT_CLIP_G_HEADS,
    HINT_CLIP_L_HEADS,
    HINT_PREDICTION,
    HINT_UNET_HEAD_CHANNELS,
    HINT_UNET_NORM_GROUPS,
    HINT_VAE_NORM_GROUPS,
    HINT_ZSNR,
    REFINER_CLIP_G_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StateDictMismatchError,
    WrongArchitectureError,
)
from .files import LazyTensor, read_sharded
from .unet_names import UNetNameTable

# VAE mid-block attention: current diffusers names and the deprecated ones some older exports still carry.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_UNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
_TEXT_WEIGHTS = ("model.safetensors", "model.fp16.safetensors")


def _unet_names(keys) -> UNetNameTable:
    """The name table of the UNet these diffusers keys describe: its levels, res blocks per level and levels with
    attention, read from the keys themselves (a folder's unet/config.json may be missing or partial)."""
    resnets = [int(m[1]) for key in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", key))]
    if not resnets:
        raise StateDictMismatchError("the diffusers UNet has no down_blocks.0.resnets: not a UNet2DConditionModel")
    levels = 1 + max(int(m[1]) for key in keys if (m := re.match(r"down_blocks\.(\d+)\.", key)))
    with_attention = {int(m[1]) for key in keys if (m := re.match(r"down_blocks\.(\d+)\.attentions\.", key))}
    return UNetNameTable(max(resnets) + 1, [level in with_attention for level in range(levels)])


def unet_from_diffusers(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """A diffusers UNet state (lazy) -> ldm names with the `model.diffusion_model.` prefix (keys the table does not
    know pass through unchanged, for validation to name)."""
    names = _unet_names(tensors)
    return {UNET_PREFIX + (names.from_diffusers(key) or key): tensor for key, tensor in tensors.items()}


def is_diffusers_vae(keys) -> bool:
    """True for diffusers AutoencoderKL names (`encoder.down_blocks.…`), False for the original ones."""
    return any(key.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for key in keys)


def vae_key_from_diffusers(key: str, num_levels: int) -> str:
    """One diffusers AutoencoderKL key -> its ldm name (unknown keys pass through unchanged)."""
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        if m[2] in _VAE_ATTENTION:
            return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # diffusers counts decoder levels from the bottleneck up; ldm counts them from full resolution down.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key


def _as_conv1x1(tensor: LazyTensor) -> LazyTensor:
    """diffusers stores the VAE attention projections as Linear [C, C]; ldm as 1x1 Conv [C, C, 1, 1]."""
    if len(tensor.shape) != 2:
        return tensor
    return LazyTensor(shape=(*tensor.shape, 1, 1), dtype=tensor.dtype, origin=tensor.origin,
                      loader=lambda: tensor.read().reshape(*tensor.shape, 1, 1))


def vae_from_diffusers(tensors: Mapping[str, LazyTensor], prefix: str = VAE_PREFIX) -> dict[str, LazyTensor]:
    """A diffusers VAE state (lazy) -> ldm names with `prefix`."""
    levels = 1 + max((int(m[1]) for key in tensors if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))),
                     default=-1)
    out = {}
    for key, tensor in tensors.items():
        name = vae_key_from_diffusers(key, levels)
        out[prefix + name] = _as_conv1x1(tensor) if ".mid.attn_1." in name and name.endswith(".weight") and \
            not name.endswith("norm.weight") else tensor
    return out


def _with_text_model(tensors: Mapping[str, LazyTensor]) -> dict[str, LazyTensor]:
    """transformers >= 5 may save CLIP text models without the `text_model.` prefix; put it back."""
    return {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": tensor
            for key, tensor in tensors.items()}


def clip_l_from_transformers(tensors: Mapping[str, LazyTensor], prefix: str = BASE_CLIP_L_PREFIX
                             ) -> dict[str, LazyTensor]:
    """A transformers CLIPTextModel state (lazy) -> the single-file CLIP-L names (already transformers names)."""
    return {prefix + key: tensor for key, tensor in _with_text_model(tensors).items()}


def _concat_rows(parts: list[LazyTensor], origin: str) -> LazyTensor:
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    return LazyTensor(shape=shape, dtype=parts[0].dtype, origin=origin,
                      loader=lambda: torch.cat([p.read() for p in parts], dim=0))


def _transposed(tensor: LazyTensor) -> LazyTensor:
    return LazyTensor(shape=tuple(reversed(tensor.shape)), dtype=tensor.dtype, origin=tensor.origin,
                      loader=lambda: tensor.read().t().contiguous())


def clip_g_from_transformers(tensors: Mapping[str, LazyTensor], prefix: str) -> dict[str, LazyTensor]:
    """A transformers CLIPTextModelWithProjection state (lazy) -> open_clip names (docs/checkpoints.md, "bigG in
    transformers", reversed).

    q/k/v projections are stacked back into `attn.in_proj_*` (q rows first) and the projection Linear weight is
    transposed back into open_clip's `text_projection` (used as x @ P).
    """
    tensors = _with_text_model(tensors)
    out: dict[str, LazyTensor] = {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    for key, tensor in tensors.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = _transposed(tensor)
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$", key):
            layer, leaf = m[1], m[2]
            base = f"text_model.encoder.layers.{layer}.self_attn."
            parts = [tensors.get(f"{base}{p}_proj.{leaf}") for p in "qkv"]
            if any(p is None for p in parts):
                raise StateDictMismatchError(f"text_encoder_2 layer {layer} lacks one of its q/k/v {leaf} tensors")
            out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = _concat_rows(parts, f"{base}q/k/v_proj.{leaf}")
        elif re.match(r"text_model\.encoder\.layers\.\d+\.self_attn\.[kv]_proj\.", key):
            continue  # consumed together with q_proj
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            module = renames.get(m[2], m[2])
            out[f"transformer.resblocks.{m[1]}.{module}.{m[3]}"] = tensor
        else:
            out[key] = tensor  # position_ids and anything unknown: left for validation to judge
    return {prefix + key: tensor for key, tensor in out.items()}


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({error})") from None
    return content if isinstance(content, dict) else {}


def _unet_hints(config: dict) -> dict[str, str]:
    """Head width from diffusers' UNet config: its `attention_head_dim` actually counts heads per level."""
    hints = {}
    heads = config.get("num_attention_heads") or config.get("attention_head_dim")
    widths = config.get("block_out_channels")
    if heads and widths:
        heads = heads if isinstance(heads, list) else [heads] * len(widths)
        head_widths = {w // h for w, h in zip(widths, heads) if h}
        if len(head_widths) == 1:
            hints[HINT_UNET_HEAD_CHANNELS] = str(head_widths.pop())
    if "norm_num_groups" in config:
        hints[HINT_UNET_NORM_GROUPS] = str(config["norm_num_groups"])
    return hints


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


# diffusers' scheduler `prediction_type` values -> ours ("sample", x0 prediction, has no denoiser here).
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v_prediction"}


def scheduler_hints(folder: Path) -> dict[str, str]:
    """The prediction type and zero terminal SNR a diffusers SDXL folder's scheduler/scheduler_config.json declares
    (its counterpart of ComfyUI's marker keys), as hints for `detect.infer_config`; a scheduler for another kind of
    schedule is refused by name, as the EDM and CosXL marker keys of single files are (detect.py)."""
    config = _read_json(folder / "scheduler" / "scheduler_config.json")
    if not config:
        return {}
    name = str(config.get("_class_name", ""))
    if name.startswith("EDM"):
        what = ("CosXL's v-prediction on an EDM schedule" if config.get("prediction_type") == "v_prediction" else
                "an EDM schedule (Playground v2.5)")
        raise WrongArchitectureError(
            f"{folder.name} is a diffusers SDXL folder whose scheduler is {name}: it was trained for {what}, with "
            "continuous noise levels. This project samples SDXL's discrete schedule (eps or v-prediction, with or "
            "without zero terminal SNR), which would turn its output into noise; use ComfyUI's own loader for it.")
    if name.startswith("FlowMatch"):
        raise WrongArchitectureError(
            f"{folder.name} is a diffusers SDXL folder whose scheduler is {name}: a rectified-flow fine-tune, which "
            "predicts a velocity along straight paths from data to noise rather than SDXL's discrete-schedule "
            "noise. These samplers run SDXL's discrete schedule only; use ComfyUI's loader with its "
            "ModelSamplingSD3 node for it.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _DIFFUSERS_PREDICTIONS:
        raise WrongArchitectureError(
            f"{folder.name}'s scheduler predicts {prediction!r}; these samplers run eps and v-prediction models "
            "(scheduler_config.json prediction_type 'epsilon' or 'v_prediction')")
    hints = {HINT_PREDICTION: _DIFFUSERS_PREDICTIONS[prediction]}
    if config.get("rescale_betas_zero_snr") is True:
        hints[HINT_ZSNR] = "true"
    return hints


def read_diffusers_folder(folder: Path) -> tuple[dict[str, LazyTensor], dict[str, str], list[Path]]:
    """A diffusers SDXL pipeline folder -> (original-layout lazy tensors, config hints, the weight files used)."""
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name", "an unnamed pipeline"))
    parts = {name for name in ("unet", "vae", "text_encoder", "text_encoder_2", "transformer")
             if isinstance(index.get(name), list) and index[name][0] is not None and (folder / name).is_dir()}
    if "unet" not in parts or "text_encoder_2" not in parts:
        if "transformer" in parts:
            what = "a transformer-based model (SD3, Flux, PixArt, ...)"
        elif "text_encoder" in parts:
            width = _read_json(folder / "text_encoder" / "config.json").get("hidden_size")
            what = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, "a single-text-encoder model")
        else:
            what = "not an SDXL pipeline"
        raise WrongArchitectureError(f"{folder.name} is a diffusers folder for {class_name} ({what}); this project "
                                     "runs SDXL, whose folders have unet/ and text_encoder_2/")
    kind = "base" if "text_encoder" in parts else "refiner"
    tensors: dict[str, LazyTensor] = {}
    used: list[Path] = []
    hints = {**_unet_hints(_read_json(folder / "unet" / "config.json")), **scheduler_hints(folder)}

    def load(part: str, names: tuple[str, ...], what: str) -> dict[str, LazyTensor]:
        found, _, path = read_sharded(folder / part, names, what)
        used.append(path)
        return found

    tensors.update(unet_from_diffusers(load("unet", _UNET_WEIGHTS, "UNet")))
    if "vae" in parts:
        vae = load("vae", _UNET_WEIGHTS, "VAE")
        tensors.update(vae_from_diffusers(vae) if is_diffusers_vae(vae)
                       else {VAE_PREFIX + k: v for k, v in vae.items()})
        vae_config = _read_json(folder / "vae" / "config.json")
        if "norm_num_groups" in vae_config:
            hints[HINT_VAE_NORM_GROUPS] = str(vae_config["norm_num_groups"])
    g_prefix = BASE_CLIP_G_PREFIX if kind == "base" else REFINER_CLIP_G_PREFIX
    tensors.update(clip_g_from_transformers(load("text_encoder_2", _TEXT_WEIGHTS, "OpenCLIP bigG text encoder"),
                                            g_prefix))
    g_heads = _read_json(folder / "text_encoder_2" / "config.json").get("num_attention_heads")
    if g_heads:
        hints[HINT_CLIP_G_HEADS] = str(g_heads)
    if kind == "base":
        tensors.update(clip_l_from_transformers(load("text_encoder", _TEXT_WEIGHTS, "CLIP-L text encoder")))
        l_heads = _read_json(folder / "text_encoder" / "config.json").get("num_attention_heads")
        if l_heads:
            hints[HINT_CLIP_L_HEADS] = str(l_heads)
    if not tensors:
        raise CheckpointNotFoundError(f"{folder}: the diffusers folder holds no weights")
    return tensors, hints, used
