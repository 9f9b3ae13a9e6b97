"""Architecture from shapes, variant detection, and the diffusers -> original key mapping, checked against the
published key manifests and against diffusers' / transformers' own modules (built on the meta device: no memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdxl_core.checkpoints.detect import (
    BASE_CLIP_G_PREFIX,
    BASE_CLIP_L_PREFIX,
    REFINER_CLIP_G_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    config_hints,
    identify,
    infer_config,
)
from sdxl_core.checkpoints.diffusers_layout import (
    clip_g_from_transformers,
    clip_l_from_transformers,
    unet_from_diffusers,
    vae_from_diffusers,
)
from sdxl_core.checkpoints.errors import StateDictMismatchError
from sdxl_core.checkpoints.files import LazyTensor
from sdxl_core.checkpoints.validation import expected_layout
from sdxl_core.config import SDXL_BASE, SDXL_REFINER, TINY_BASE, TINY_REFINER
from tests._checkpoints import single_file_state, single_thread, tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"
_BOOKKEEPING = ("position_ids", "logit_scale")


def _manifest(kind: str) -> dict[str, tuple]:
    path = MANIFESTS / f"sdxl_{kind}_manifest.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} not available")
    return {key: tuple(entry["shape"]) for key, entry in json.loads(path.read_text()).items()}


def _lazy(state: dict) -> dict[str, LazyTensor]:
    return {k: LazyTensor(tuple(v.shape), v.dtype, k, loader=lambda v=v: v) for k, v in state.items()}


def _shapes(lazy: dict[str, LazyTensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in lazy.items()}


def _part(shapes: dict, prefix: str) -> dict:
    return {k: v for k, v in shapes.items() if k.startswith(prefix) and not k.endswith(_BOOKKEEPING)}


@pytest.mark.parametrize("kind, expected", [("base", SDXL_BASE), ("refiner", SDXL_REFINER)])
def test_full_manifests_infer_the_published_configs(kind, expected):
    shapes = _manifest(kind)
    assert identify(shapes).kind == f"sdxl-{kind}"
    assert infer_config(shapes) == expected


@pytest.mark.parametrize("config", [SDXL_BASE, SDXL_REFINER])
def test_full_size_layout_infers_its_config(config):
    # Runs without the manifests too: the full-size layout of our own modules (built on meta) reads back exactly.
    assert infer_config(expected_layout(config)) == config


@pytest.mark.parametrize("kind, config", [("base", SDXL_BASE), ("refiner", SDXL_REFINER)])
def test_expected_layout_is_the_manifest(kind, config):
    manifest = _manifest(kind)
    weights = {k: v for k, v in manifest.items() if not k.endswith(_BOOKKEEPING)}
    assert expected_layout(config) == weights


@pytest.mark.parametrize("config", [TINY_BASE, TINY_REFINER])
def test_tiny_checkpoints_infer_the_tiny_configs(config):
    shapes = {k: tuple(v.shape) for k, v in single_file_state(tiny_model(config)).items()}
    assert infer_config(shapes, config_hints(config)) == config
    # Head counts are invisible in shapes: without the metadata a 32-wide CLIP-L cannot be read.
    if config.clip_l is not None:
        with pytest.raises(StateDictMismatchError, match="CLIP-L text encoder attention heads"):
            infer_config(shapes)


def test_identify_tells_variants_apart_by_keys_not_names():
    base = _manifest("base")
    refiner = _manifest("refiner")
    assert identify(refiner).kind == "sdxl-refiner"
    vae_only = {k[len(VAE_PREFIX):]: v for k, v in base.items() if k.startswith(VAE_PREFIX)}
    assert identify(vae_only).kind == "sdxl-vae"
    unet_only = {k: v for k, v in base.items() if k.startswith(UNET_PREFIX)}
    found = identify(unet_only)
    assert found.kind == "unet-only" and "SDXL base UNet" in found.description


# --- diffusers -> original mapping against the real diffusers / transformers modules --------------------------------

def _diffusers_unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "base":
        kwargs = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                      attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                      projection_class_embeddings_input_dim=2816)
    else:
        kwargs = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      block_out_channels=(384, 768, 1536, 1536), transformer_layers_per_block=4,
                      attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
                      projection_class_embeddings_input_dim=2560)
    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=128, layers_per_block=2, use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256, **kwargs)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_diffusers_unet_names_map_onto_the_manifest(kind):
    mapped = _shapes(unet_from_diffusers(_lazy(_diffusers_unet(kind).state_dict())))
    assert mapped == _part(_manifest(kind), UNET_PREFIX)


def test_diffusers_vae_names_map_onto_the_manifest():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    mapped = _shapes(vae_from_diffusers(_lazy(vae.state_dict())))
    assert mapped == _part(_manifest("base"), VAE_PREFIX)


def test_deprecated_diffusers_vae_attention_names():
    state = {"encoder.mid_block.attentions.0.query.weight": torch.ones(4, 4),
             "decoder.mid_block.attentions.0.proj_attn.bias": torch.ones(4),
             "decoder.up_blocks.0.upsamplers.0.conv.weight": torch.ones(1),
             "decoder.up_blocks.3.resnets.2.conv_shortcut.weight": torch.ones(1)}
    mapped = vae_from_diffusers(_lazy(state))
    assert _shapes(mapped) == {"first_stage_model.encoder.mid.attn_1.q.weight": (4, 4, 1, 1),
                               "first_stage_model.decoder.mid.attn_1.proj_out.bias": (4,),
                               "first_stage_model.decoder.up.3.upsample.conv.weight": (1,),
                               "first_stage_model.decoder.up.0.block.2.nin_shortcut.weight": (1,)}
    assert mapped["first_stage_model.encoder.mid.attn_1.q.weight"].read().shape == (4, 4, 1, 1)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_transformers_clip_names_map_onto_the_manifest(kind):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    manifest = _manifest(kind)
    g_prefix = BASE_CLIP_G_PREFIX if kind == "base" else REFINER_CLIP_G_PREFIX
    with torch.device("meta"):
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=20,
                                                           projection_dim=1280, hidden_act="gelu"))
    assert _shapes(clip_g_from_transformers(_lazy(big_g.state_dict()), g_prefix)) == _part(manifest, g_prefix)
    if kind == "base":
        with torch.device("meta"):
            clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                  num_attention_heads=12, hidden_act="quick_gelu"))
        mapped = _shapes(clip_l_from_transformers(_lazy(clip_l.state_dict())))
        assert {k: v for k, v in mapped.items() if not k.endswith(_BOOKKEEPING)} == _part(manifest, BASE_CLIP_L_PREFIX)


def test_clip_g_mapping_inverts_the_transformers_conversion_values():
    from sdxl_core.text.openclip_conversion import openclip_to_transformers

    model = tiny_model(TINY_REFINER, seed=5)
    openclip = model.clip_g.state_dict()
    hf = openclip_to_transformers(openclip)
    back = clip_g_from_transformers(_lazy(hf), "")
    assert back.keys() == openclip.keys()
    for key, tensor in openclip.items():
        assert torch.equal(back[key].read(), tensor), key
