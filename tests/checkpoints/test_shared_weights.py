"""Networks built around tensors another runtime holds (sdxl_core/checkpoints/shared_weights.py): the same tensor
objects, the same outputs, and a sentence instead of a half-adopted network when the layouts differ."""

import pytest
import torch

from sdxl_core.checkpoints.errors import StateDictMismatchError
from sdxl_core.checkpoints.shared_weights import (
    adopt_tensors,
    named_tensors,
    stage_config_for,
    text_encoder_config,
    text_encoder_name,
    transformers_name,
)
from sdxl_core.checkpoints.validation import build_component
from sdxl_core.config import SDXL_BASE, SDXL_REFINER, TINY_BASE, TINY_REFINER
from sdxl_core.text.encoders import TextEncoder
from tests.models.test_unet import random_inputs


def _pointers(module) -> list[int]:
    return [tensor.data_ptr() for tensor in named_tensors(module).values()]


def test_unet_adopts_the_very_tensors_and_computes_the_same(tiny_base):
    unet = adopt_tensors(build_component("unet", TINY_BASE), named_tensors(tiny_base.unet), "UNet")
    assert _pointers(unet) == _pointers(tiny_base.unet)
    assert all(a is b for a, b in zip(unet.parameters(), tiny_base.unet.parameters()))  # nn.Parameter objects
    x, t, context, y, _, _ = random_inputs(TINY_BASE.unet, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(unet(x, t, context, y), tiny_base.unet(x, t, context, y))


def test_a_different_layout_is_refused_and_nothing_is_adopted(tiny_base):
    tensors = named_tensors(tiny_base.unet)
    missing = dict(tensors)
    del missing["out.2.bias"]
    unet = build_component("unet", TINY_BASE)
    with pytest.raises(StateDictMismatchError, match=r"missing \['out.2.bias'\]"):
        adopt_tensors(unet, missing, "UNet")
    assert all(p.is_meta for p in unet.parameters())
    wrong = {**tensors, "out.2.bias": torch.zeros(5), "extra.weight": torch.zeros(1)}
    with pytest.raises(StateDictMismatchError, match=r"unexpected \['extra.weight'\].*shapes differ: \['out.2.bias"):
        adopt_tensors(unet, wrong, "UNet")


@pytest.mark.parametrize("name", ["clip_g", "clip_l"])
def test_text_encoder_from_transformers_names(tiny_base, name):
    original = getattr(tiny_base, name)
    theirs = {transformers_name(original, key): value for key, value in named_tensors(original).items()}
    assert all(key.startswith(("text_model.", "text_projection.")) for key in theirs)
    config = text_encoder_config({k: tuple(v.shape) for k, v in theirs.items()},
                                 num_heads=original.config.num_heads, hidden_act=original.config.hidden_act)
    assert config == original.config
    encoder = TextEncoder(config, device="meta")
    adopt_tensors(encoder, {text_encoder_name(encoder, key): value for key, value in theirs.items()}, name)
    assert _pointers(encoder) == _pointers(original)
    tokens = torch.randint(0, 49406, (1, 77), generator=torch.Generator().manual_seed(1))
    tokens[0, 0], tokens[0, 9:] = 49406, 49407  # BOS, 8 words, EOS and padding
    with torch.inference_mode():
        for ours, reference in zip(encoder(tokens), original(tokens)):
            assert (ours is None and reference is None) or torch.equal(ours, reference)


def test_stage_config_completes_a_stage_from_its_parts():
    assert stage_config_for("base", unet=SDXL_BASE.unet) == SDXL_BASE
    assert stage_config_for("refiner", clip_g=SDXL_REFINER.clip_g) == SDXL_REFINER
    assert stage_config_for("base", clip_g=TINY_BASE.clip_g, clip_l=TINY_BASE.clip_l).unet == TINY_BASE.unet
    tiny = stage_config_for("refiner", unet=TINY_REFINER.unet, prediction="v_prediction", zsnr=True)
    assert tiny.clip_g == TINY_REFINER.clip_g and tiny.prediction == "v_prediction" and tiny.noise_schedule.zsnr
    with pytest.raises(StateDictMismatchError, match="do not form an SDXL refiner"):
        stage_config_for("refiner", unet=SDXL_BASE.unet)
