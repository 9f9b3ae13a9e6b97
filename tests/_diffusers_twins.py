"""diffusers twins of our UNet and VAE: the same tensors as diffusers' UNet2DConditionModel / AutoencoderKL.

This module exists for the parity tests and the benchmark only; the package never calls it. The conversions are
diffusers' own single-file code (`diffusers.loaders.single_file_utils`), so a twin is an independent reference, not
our code read back. diffusers is imported inside the functions: the package imports and runs without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from sdxl_core.config import ADM_SCALAR_EMBED_DIM, UNetConfig
from sdxl_core.models.unet import UNetModel
from sdxl_core.models.vae import AutoencoderKL
from sdxl_core.runtime.optimize import is_qkv_fused

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"the diffusers twins need {name!r} ({error}); diffusers is the reference implementation "
                          "for the parity tests and the benchmark: install the `test` extra, "
                          "`pip install -e '.[test]'`") from error


def sgm_network_config(config: UNetConfig) -> dict:
    """The sgm/ldm yaml (`model.params.network_config`) that describes `config`, as diffusers' converter reads it."""
    levels_with_attention = [level for level, depth in enumerate(config.transformer_depth) if depth]
    # diffusers takes the mid-block depth from the last level's entry; levels without attention ignore theirs.
    depths = [depth or config.transformer_depth_middle for depth in config.transformer_depth]
    if depths[-1] != config.transformer_depth_middle:
        raise ValueError(f"diffusers cannot express {config}: its mid-block depth is the last level's")
    return {"model": {"params": {
        "network_config": {"params": {
            "in_channels": config.in_channels, "out_channels": config.out_channels,
            "model_channels": config.model_channels, "channel_mult": list(config.channel_mult),
            "num_res_blocks": config.num_res_blocks,
            "attention_resolutions": [2 ** level for level in levels_with_attention],
            "transformer_depth": depths, "num_head_channels": config.num_head_channels,
            "context_dim": config.context_dim, "num_classes": "sequential",
            "adm_in_channels": config.adm_in_channels, "use_linear_in_transformer": True,
        }},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}


def diffusers_unet(unet: UNetModel, *, share_memory: bool = False):
    """diffusers' UNet2DConditionModel holding `unet`'s weights, converted by diffusers' single-file code.

    `share_memory` adopts our tensors (no second copy: full size, benchmarks) instead of copying them."""
    single_file = _import("diffusers.loaders.single_file_utils")
    UNet2DConditionModel = _import("diffusers").UNet2DConditionModel

    if is_qkv_fused(unet):
        raise RuntimeError("build the diffusers twin before fusing QKV (it converts the plain layout)")
    checkpoint = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    config = single_file.create_unet_diffusers_config_from_ldm(sgm_network_config(unet.config), checkpoint)
    # diffusers recognises SDXL's ADM only by context width 2048/1280; say it explicitly (the tiny configs differ).
    config.update(class_embed_type=None, addition_embed_type="text_time",
                  addition_time_embed_dim=ADM_SCALAR_EMBED_DIM)
    converted = single_file.convert_ldm_unet_checkpoint(checkpoint, config)
    if share_memory:
        with torch.device("meta"):
            twin = UNet2DConditionModel(**config)
        twin.load_state_dict(converted, strict=True, assign=True)
    else:
        twin = UNet2DConditionModel(**config)
        twin.load_state_dict(converted, strict=True)
    return twin.eval()


def diffusers_vae(vae: AutoencoderKL, dtype: torch.dtype | None = None, *, share_memory: bool = False):
    """diffusers' AutoencoderKL holding `vae`'s weights, converted by diffusers' single-file code; cast to `dtype`
    when given. `share_memory` adopts our tensors instead of copying them."""
    convert_ldm_vae_checkpoint = _import("diffusers.loaders.single_file_utils").convert_ldm_vae_checkpoint
    DiffusersAutoencoderKL = _import("diffusers").AutoencoderKL

    cfg = vae.config
    levels = len(cfg.channel_mult)
    config = {
        "in_channels": cfg.image_channels, "out_channels": cfg.image_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "latent_channels": cfg.latent_channels, "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scale_factor,
    }
    checkpoint = {VAE_PREFIX + k: v for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, config)
    if share_memory:
        with torch.device("meta"):
            twin = DiffusersAutoencoderKL(**config)
        twin.load_state_dict(converted, strict=True, assign=True)
    else:
        twin = DiffusersAutoencoderKL(**config).to(vae.dtype)
        twin.load_state_dict(converted, strict=True)
    return (twin.to(dtype) if dtype is not None and dtype != vae.dtype else twin).eval()


# diffusers' ControlNet converter maps the ADM embedding only for its SD-era keys; SDXL's label_emb is renamed here.
_CONTROLNET_ADM_NAMES = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def diffusers_controlnet(controlnet):
    """diffusers' ControlNetModel holding `controlnet`'s weights (an sdxl_core ControlNetModel), converted by
    diffusers' single-file code (`create_controlnet_diffusers_config_from_ldm`, `convert_controlnet_checkpoint`)."""
    single_file = _import("diffusers.loaders.single_file_utils")
    DiffusersControlNetModel = _import("diffusers").ControlNetModel

    cfg = controlnet.config
    original = sgm_network_config(cfg.unet)
    original["model"]["params"]["control_stage_config"] = {"params": {"hint_channels": cfg.hint_channels}}
    checkpoint = {"control_model." + k: v for k, v in controlnet.state_dict().items()}
    # `create_controlnet_diffusers_config_from_ldm` does this selection, but in diffusers 0.42 it calls the UNet
    # helper without its checkpoint argument and fails; the same fields are taken from the UNet config here.
    unet_config = single_file.create_unet_diffusers_config_from_ldm(original, checkpoint)
    config = {key: unet_config[key] for key in (
        "in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
        "attention_head_dim", "use_linear_projection", "transformer_layers_per_block",
        "projection_class_embeddings_input_dim")}
    config["conditioning_channels"] = cfg.hint_channels
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=ADM_SCALAR_EMBED_DIM,
                  conditioning_embedding_out_channels=list(cfg.hint_block_channels),
                  norm_num_groups=cfg.unet.norm_groups)
    converted = single_file.convert_controlnet_checkpoint(checkpoint, config)
    for ours, theirs in _CONTROLNET_ADM_NAMES.items():
        for leaf in ("weight", "bias"):
            converted[f"{theirs}.{leaf}"] = checkpoint[f"control_model.{ours}.{leaf}"]
    twin = DiffusersControlNetModel(**config)
    twin.load_state_dict(converted, strict=True)
    return twin.eval()
