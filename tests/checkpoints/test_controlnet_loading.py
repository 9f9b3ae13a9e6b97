"""ControlNet files: diffusers folder / file and original single file load into the same network; other kinds of
files are refused with a sentence before any tensor is read."""


import pytest
import torch
from safetensors.torch import save_file

from sdxl_core.checkpoints.controlnet import inspect_controlnet, load_controlnet
from sdxl_core.checkpoints.detect import HINT_UNET_HEAD_CHANNELS
from sdxl_core.checkpoints.errors import CheckpointError, WrongArchitectureError, WrongComponentError
from sdxl_core.config import TINY_BASE_UNET, TINY_CONTROLNET
from tests._diffusers_twins import diffusers_controlnet
from tests.models.test_controlnet import random_controlnet
from tests.models.test_unet import random_inputs

HEAD_HINT = {HINT_UNET_HEAD_CHANNELS: str(TINY_BASE_UNET.num_head_channels)}


@pytest.fixture(scope="module")
def reference():
    return random_controlnet()


def _residuals(model):
    x, timesteps, context, y, _, _ = random_inputs(TINY_BASE_UNET, 1, 8, 8)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(x, timesteps, context, y, hint)
    return out.skips + (out.middle,)


def _assert_same_network(loaded, reference):
    assert loaded.config == reference.config
    for a, b in zip(_residuals(loaded), _residuals(reference)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prefix", ["control_model.", ""], ids=["sgm-prefix", "bare"])
def test_original_single_file(tmp_path, reference, prefix):
    path = tmp_path / "cn.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in reference.state_dict().items()}, str(path), metadata=HEAD_HINT)
    config, layout = inspect_controlnet(path)
    assert layout == "original" and config == TINY_CONTROLNET
    _assert_same_network(load_controlnet(path, dtype=torch.float32), reference)


def test_diffusers_folder_and_lone_file(tmp_path, reference):
    pytest.importorskip("diffusers")
    folder = tmp_path / "controlnet-tiny"
    diffusers_controlnet(reference).save_pretrained(folder, safe_serialization=True)
    config, layout = inspect_controlnet(folder)
    assert layout == "diffusers" and config == TINY_CONTROLNET
    _assert_same_network(load_controlnet(folder, dtype=torch.float32), reference)
    # The lone file beside its config.json loads the same way.
    _assert_same_network(load_controlnet(folder / "diffusion_pytorch_model.safetensors", dtype=torch.float32),
                         reference)


def test_load_casts_to_the_asked_dtype(tmp_path, reference):
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path), metadata=HEAD_HINT)
    model = load_controlnet(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sd15_controlnet_is_refused(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    sd15 = diffusers.ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
                                     attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     conditioning_embedding_out_channels=(16, 32), norm_num_groups=32)
    sd15.save_pretrained(tmp_path / "sd15", safe_serialization=True)
    with pytest.raises(WrongArchitectureError, match=r"ControlNet for SD 1\.x \(768-wide.*use an SDXL ControlNet"):
        load_controlnet(tmp_path / "sd15")


@pytest.mark.parametrize("keys, message", [
    ({"lora_controlnet": torch.zeros(1)}, "control-LoRA"),
    ({"control_add_embedding.linear_1.weight": torch.zeros(2, 2),
      "controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, "union"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, "full diffusion checkpoint"),
    ({"foo.weight": torch.zeros(2)}, "not a ControlNet"),
])
def test_other_files_are_refused(tmp_path, keys, message):
    path = tmp_path / "x.safetensors"
    save_file(keys, str(path))
    with pytest.raises(WrongComponentError, match=message):
        load_controlnet(path)


def test_damaged_layout_is_refused_before_loading(tmp_path, reference):
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    del state["zero_convs.3.0.weight"]
    path = tmp_path / "cn.safetensors"
    save_file(state, str(path), metadata=HEAD_HINT)
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. 'zero_convs\.3\.0\.weight'\)"):
        load_controlnet(path)
