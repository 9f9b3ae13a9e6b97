"""Teach an in-process ComfyUI to load this project's tiny SDXL checkpoints as SDXL, for the tests only.

ComfyUI recognises a checkpoint by comparing the UNet's detected shape with the published models
(`comfy/supported_models.py`) and builds its text encoders and VAE in their published sizes, so the tiny files
(sdxl_core.config TINY_BASE / TINY_REFINER) would not load. Three test-only additions make them load through
ComfyUI's own code paths, with nothing else changed:
- model classes `TinySDXL` / `TinySDXLRefiner`: subclasses of ComfyUI's `SDXL` / `SDXLRefiner` (so the MODEL is
  ComfyUI's own `model_base.SDXL` / `SDXLRefiner`, with its ADM encoding and latent format), matching the tiny UNets'
  detected configs, placed first in ComfyUI's list of supported models;
- their CLIP: ComfyUI's SDXL CLIP classes on the tiny text-model configs (through ComfyUI's own JSON config), with
  a bigG projection from its width to the 1280 of the pooled vector (ComfyUI's CLIP text model projects to its
  own width, which for the published bigG is the same 1280);
- the VAE: ComfyUI's `VAE` given the tiny VAE's architecture through its own `config` argument.
Call `register()` after ComfyUI's modules are importable (COMFYUI_PATH on sys.path, args parsed).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sdxl_core.config import TINY_BASE, TINY_REFINER, TINY_VAE, TextEncoderConfig

_REGISTERED = False


def _depths(unet) -> list[int]:
    """ComfyUI's `transformer_depth`: one entry per res block on the way down."""
    return [depth for depth in unet.transformer_depth for _ in range(unet.num_res_blocks)]


def _text_json(comfy_dir: Path, name: str, config: TextEncoderConfig) -> dict:
    base = json.loads((comfy_dir / name).read_text())
    base.update(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                num_attention_heads=config.num_heads, num_hidden_layers=config.num_layers,
                hidden_act=config.hidden_act, projection_dim=config.projection_dim or config.hidden_size)
    return base


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    import comfy.clip_model
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base

    comfy_dir = Path(comfy.sd.__file__).parent
    json_l = _text_json(comfy_dir, "sd1_clip_config.json", TINY_BASE.clip_l)
    json_g = _text_json(comfy_dir, "clip_config_bigg.json", TINY_BASE.clip_g)

    class ProjectedCLIPTextModel(comfy.clip_model.CLIPTextModel):
        def __init__(self, config_dict, dtype, device, operations):
            super().__init__(config_dict, dtype, device, operations)
            self.text_projection = operations.Linear(config_dict["hidden_size"], config_dict["projection_dim"],
                                                     bias=False, dtype=dtype, device=device)

    class TinyClipG(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **_):  # noqa: B006 - ComfyUI's signature
            super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=copy.deepcopy(json_g),
                             dtype=dtype, special_tokens={"start": 49406, "end": 49407, "pad": 0},
                             layer_norm_hidden_state=False, return_projected_pooled=True,
                             model_class=ProjectedCLIPTextModel,
                             model_options={**model_options, "model_name": "clip_g"})

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            comfy.sdxl_clip.torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(
                layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
                textmodel_json_config=copy.deepcopy(json_l), model_options={**model_options, "model_name": "clip_l"})
            self.clip_g = TinyClipG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    class TinySDXLRefinerClipModel(comfy.sdxl_clip.SDXLRefinerClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            comfy.sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, clip_name="g", clip_model=TinyClipG,
                                                 model_options=model_options)

    target = comfy.supported_models_base.ClipTarget
    unet_keys = {"use_linear_in_transformer": True, "use_temporal_attention": False}

    class TinySDXL(comfy.supported_models.SDXL):
        unet_config = {"model_channels": TINY_BASE.unet.model_channels, "context_dim": TINY_BASE.unet.context_dim,
                       "adm_in_channels": TINY_BASE.unet.adm_in_channels,
                       "transformer_depth": _depths(TINY_BASE.unet), **unet_keys}
        unet_extra_config = {"num_heads": -1, "num_head_channels": TINY_BASE.unet.num_head_channels}

        def clip_target(self, state_dict={}):  # noqa: B006
            return target(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    class TinySDXLRefiner(comfy.supported_models.SDXLRefiner):
        unet_config = {"model_channels": TINY_REFINER.unet.model_channels,
                       "context_dim": TINY_REFINER.unet.context_dim,
                       "adm_in_channels": TINY_REFINER.unet.adm_in_channels,
                       "transformer_depth": _depths(TINY_REFINER.unet), **unet_keys}
        unet_extra_config = {"num_heads": -1, "num_head_channels": TINY_REFINER.unet.num_head_channels}

        def clip_target(self, state_dict={}):  # noqa: B006
            return target(comfy.sdxl_clip.SDXLTokenizer, TinySDXLRefinerClipModel)

    comfy.supported_models.models.insert(0, TinySDXLRefiner)
    comfy.supported_models.models.insert(0, TinySDXL)

    tiny_ddconfig = {"double_z": True, "z_channels": TINY_VAE.latent_channels, "resolution": 256, "in_channels": 3,
                     "out_ch": 3, "ch": TINY_VAE.base_channels, "ch_mult": list(TINY_VAE.channel_mult),
                     "num_res_blocks": TINY_VAE.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    original_vae_init = comfy.sd.VAE.__init__

    def vae_init(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        weight = (sd or {}).get("encoder.conv_in.weight")
        if config is None and weight is not None and weight.shape[0] == TINY_VAE.base_channels:
            config = {"params": {"ddconfig": tiny_ddconfig, "embed_dim": TINY_VAE.latent_channels}}
        original_vae_init(self, sd=sd, device=device, config=config, dtype=dtype, metadata=metadata)

    comfy.sd.VAE.__init__ = vae_init
    _REGISTERED = True
