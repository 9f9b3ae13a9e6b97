"""ControlNet network and the UNet's control residuals: parity with diffusers' ControlNetModel and
UNet2DConditionModel (`down_block_additional_residuals`) on tiny random weights."""

import pytest
import torch

from sdxl_core.config import TINY_BASE_UNET, TINY_CONTROLNET, TINY_REFINER_UNET, ControlNetConfig
from sdxl_core.models.controlnet import ControlNetModel
from sdxl_core.models.unet import ControlResiduals, UNetModel
from tests._diffusers_twins import diffusers_controlnet, diffusers_unet
from tests.models.test_unet import random_inputs, randomize_, relative_error


def random_controlnet(config: ControlNetConfig = TINY_CONTROLNET, seed: int = 3) -> ControlNetModel:
    model = ControlNetModel(config, device="meta").to_empty(device="cpu")
    randomize_(model, seed)
    return model.eval()


def random_unet(config=TINY_BASE_UNET, seed: int = 0) -> UNetModel:
    model = UNetModel(config, device="meta").to_empty(device="cpu")
    randomize_(model, seed)
    return model.eval()


@pytest.mark.parametrize("unet_config", [TINY_BASE_UNET, TINY_REFINER_UNET], ids=["base", "refiner"])
@pytest.mark.parametrize("hw", [(16, 16), (9, 13)], ids=["square", "odd"])
def test_controlnet_matches_diffusers(unet_config, hw):
    pytest.importorskip("diffusers.loaders.single_file_utils")
    controlnet = random_controlnet(ControlNetConfig(unet=unet_config))
    twin = diffusers_controlnet(controlnet)
    x, timesteps, context, y, pooled, time_ids = random_inputs(unet_config, 2, *hw)
    hint = torch.rand(2, 3, hw[0] * 8, hw[1] * 8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = controlnet(x, timesteps, context, y, hint)
        down, mid = twin(x, timesteps, encoder_hidden_states=context, controlnet_cond=hint,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
    assert len(ours.skips) == len(down) == len(controlnet.input_blocks)
    for index, (a, b) in enumerate(zip(ours.skips + (ours.middle,), tuple(down) + (mid,))):
        assert a.shape == b.shape
        assert b.abs().max() > 1e-2
        assert relative_error(a, b) <= 1e-5, f"residual {index}"


def test_unet_with_residuals_matches_diffusers():
    pytest.importorskip("diffusers.loaders.single_file_utils")
    unet = random_unet()
    twin = diffusers_unet(unet)
    controlnet = random_controlnet()
    x, timesteps, context, y, pooled, time_ids = random_inputs(TINY_BASE_UNET, 2, 16, 16)
    hint = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        control = controlnet(x, timesteps, context, y, hint).scaled(0.7)
        ours = unet(x, timesteps, context, y, control=control)
        plain = unet(x, timesteps, context, y)
        ref = twin(x, timesteps, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                   down_block_additional_residuals=[t.clone() for t in control.skips],
                   mid_block_additional_residual=control.middle.clone()).sample
    assert (ours - plain).abs().max() > 1e-2  # the residuals change the prediction
    assert relative_error(ours, ref) <= 1e-5


def test_no_control_is_the_plain_unet_bit_for_bit():
    unet = random_unet()
    x, timesteps, context, y, _, _ = random_inputs(TINY_BASE_UNET, 2, 8, 8)
    with torch.inference_mode():
        plain = unet(x, timesteps, context, y)
        empty = unet(x, timesteps, context, y, control=ControlResiduals())
    assert torch.equal(plain, empty)


def test_input_residuals_flow_on_through_the_down_path():
    """An `inputs` residual (adapter style) changes the next blocks too; a `skips` one only its skip."""
    unet = random_unet()
    x, timesteps, context, y, _, _ = random_inputs(TINY_BASE_UNET, 1, 8, 8)
    bump = torch.full((1, TINY_BASE_UNET.model_channels, 8, 8), 0.5)
    blocks = len(unet.input_blocks)
    with torch.inference_mode():
        as_input = unet(x, timesteps, context, y, control=ControlResiduals(inputs=(bump,) + (None,) * (blocks - 1)))
        as_skip = unet(x, timesteps, context, y, control=ControlResiduals(skips=(bump,) + (None,) * (blocks - 1)))
    assert (as_input - as_skip).abs().max() > 1e-3


def test_residuals_are_checked_against_the_unet():
    unet = random_unet()
    x, timesteps, context, y, _, _ = random_inputs(TINY_BASE_UNET, 1, 8, 8)
    with pytest.raises(ValueError, match="9 input blocks"):
        unet(x, timesteps, context, y, control=ControlResiduals(skips=(None,) * 4))
    with pytest.raises(ValueError, match="cannot be added at the middle block"):
        unet(x, timesteps, context, y, control=ControlResiduals(middle=torch.zeros(1, 3, 2, 2)))


def test_controlnet_refuses_a_hint_of_the_wrong_size():
    controlnet = random_controlnet()
    x, timesteps, context, y, _, _ = random_inputs(TINY_BASE_UNET, 1, 8, 8)
    with pytest.raises(ValueError, match=r"control image must be \[batch, 3, 64, 64\]"):
        controlnet(x, timesteps, context, y, torch.zeros(1, 3, 32, 32))


def test_summed_and_scaled_residuals():
    a = ControlResiduals(skips=(torch.ones(1), None), middle=torch.ones(1))
    b = ControlResiduals(skips=(torch.ones(1), torch.ones(1)), middle=None)
    total = ControlResiduals.summed([a.scaled(2.0), b])
    assert total.skips[0].item() == 3.0 and total.skips[1].item() == 1.0 and total.middle.item() == 2.0
