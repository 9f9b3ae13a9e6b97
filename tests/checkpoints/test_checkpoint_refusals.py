"""Every file the loader must refuse, with the message it must give (and never a bare traceback)."""

from __future__ import annotations

import json

import pytest
import torch

from sdxl_core.checkpoints.detect import config_hints
from sdxl_core.checkpoints.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NonFiniteWeightError,
    StateDictMismatchError,
    UnsafeFormatError,
    UnsupportedFormatError,
    WrongArchitectureError,
    WrongComponentError,
    WrongVariantError,
)
from sdxl_core.checkpoints.loading import load_checkpoint, load_vae
from sdxl_core.config import TINY_BASE, TINY_REFINER
from tests._checkpoints import (
    single_file_state,
    single_thread,
    tiny_model,
    write_checkpoint,
    write_diffusers_folder,
    write_pickle,
    write_sd2_like,
    write_sd15_like,
    write_tensors,
    write_truncated,
    write_vae_file,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def base():
    return tiny_model(TINY_BASE, seed=3)


@pytest.fixture(scope="module")
def files(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusals")
    return {"base": write_checkpoint(base, folder / "base.safetensors", dtype=torch.float16),
            "refiner": write_checkpoint(tiny_model(TINY_REFINER, seed=4), folder / "refiner.safetensors")}


def _refused(error_type, match, path, **kwargs):
    with pytest.raises(error_type, match=match) as caught:
        load_checkpoint(path, **kwargs)
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, ValueError)
    return str(caught.value)


def _with(base, tmp_path, name, edit):
    state = single_file_state(base)
    edit(state)
    return write_tensors(tmp_path / name, state, metadata=config_hints(base.config))


def test_truncated_file(files, tmp_path):
    cut = write_truncated(files["base"], tmp_path / "cut.safetensors")
    message = _refused(CorruptCheckpointError, "truncated", cut)
    assert "bytes missing" in message and "Download the file again" in message


def test_truncated_inside_the_header(files, tmp_path):
    _refused(CorruptCheckpointError, "truncated: its header alone needs",
             write_truncated(files["base"], tmp_path / "cut.safetensors", keep_fraction=0.001))


def test_empty_and_garbled_headers(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _refused(CorruptCheckpointError, "is empty", tmp_path / "empty.safetensors")
    (tmp_path / "json.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    _refused(CorruptCheckpointError, "not valid JSON", tmp_path / "json.safetensors")
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "offsets.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    _refused(CorruptCheckpointError, "needs 32 bytes", tmp_path / "offsets.safetensors")


@pytest.mark.parametrize("name", ["model.ckpt", "disguised.safetensors"])
def test_pickle_is_refused_by_content(name, tmp_path):
    message = _refused(UnsafeFormatError, "pickle", write_pickle(tmp_path / name))
    assert "arbitrary code" in message and ".safetensors" in message


@pytest.mark.parametrize("content, match", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 6938078334\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML"),
    (b"GGUF\x03\x00\x00\x00" + bytes(32), "GGUF .* download the .safetensors release"),
])
def test_other_formats(content, match, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(content)
    _refused(UnsupportedFormatError, match, tmp_path / "model.safetensors")


def test_missing_path(tmp_path):
    _refused(CheckpointNotFoundError, "no such file", tmp_path / "nothing.safetensors")


def test_sd15_checkpoint(tmp_path):
    message = _refused(WrongArchitectureError, "SD 1.x checkpoint", write_sd15_like(tmp_path / "v1-5.safetensors"))
    assert "768-wide cross-attention" in message and "this project runs SDXL" in message


def test_sd2_checkpoint(tmp_path):
    message = _refused(WrongArchitectureError, "SD 2.x checkpoint", write_sd2_like(tmp_path / "v2-1.safetensors"))
    assert "1024-wide cross-attention" in message


@pytest.mark.parametrize("key, family", [
    ("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight", "Stable Diffusion 3"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
])
def test_other_families_by_probe_keys(key, family, tmp_path):
    path = write_tensors(tmp_path / "other.safetensors", {key: torch.zeros(2, 2)})
    _refused(WrongArchitectureError, family, path)


@pytest.mark.parametrize("marker, what", [("edm_mean", "Playground v2.5"), ("edm_vpred.sigma_max", "CosXL")])
def test_sdxl_architecture_with_another_schedule(marker, what, base, tmp_path):
    path = _with(base, tmp_path, "edm.safetensors", lambda state: state.update({marker: torch.tensor([])}))
    message = _refused(WrongArchitectureError, what, path)
    assert "discrete schedule" in message and repr(marker) in message


def test_unknown_content_lists_what_was_found(tmp_path):
    path = write_tensors(tmp_path / "x.safetensors", {"backbone.layer1.weight": torch.zeros(2),
                                                      "backbone.layer2.weight": torch.zeros(2),
                                                      "head.fc.bias": torch.zeros(2)})
    message = _refused(WrongArchitectureError, "not an SDXL checkpoint", path)
    assert "backbone.layer1.* (1)" in message and "head.fc.* (1)" in message


def test_vae_only_file_as_checkpoint(base, tmp_path):
    for layout in ("original", "diffusers"):
        path = write_vae_file(base.vae, tmp_path / f"vae-{layout}.safetensors", layout=layout)
        _refused(WrongComponentError, "VAE-only file", path)


def test_lora_and_bare_unet(base, tmp_path):
    lora = write_tensors(tmp_path / "lora.safetensors", {"lora_unet_down_blocks_1.lora_up.weight": torch.zeros(2)})
    _refused(WrongComponentError, "LoRA", lora)
    unet = write_tensors(tmp_path / "unet.safetensors", {k: v for k, v in base.unet.state_dict().items()})
    _refused(WrongComponentError, "UNet", unet)


def test_checkpoint_given_as_vae(files):
    with pytest.raises(WrongComponentError, match="full SDXL base checkpoint, not a VAE file"):
        load_vae(files["base"])


def test_sixteen_channel_vae(tmp_path):
    path = write_tensors(tmp_path / "ae.safetensors", {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
                                                       "encoder.down.0.block.0.conv2.weight": torch.zeros(8, 8, 3, 3),
                                                       "encoder.conv_out.weight": torch.zeros(32, 8, 3, 3),
                                                       "decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)})
    with pytest.raises(WrongArchitectureError, match="16-channel VAE .* Select an SDXL VAE"):
        load_vae(path)


def test_base_where_refiner_required_and_reverse(files):
    message = _refused(WrongVariantError, "is an SDXL base checkpoint, but an SDXL refiner is required",
                       files["base"], expect="refiner")
    assert "base.safetensors" in message
    _refused(WrongVariantError, "is an SDXL refiner checkpoint, but an SDXL base is required", files["refiner"],
             expect="base")


def test_nan_weight_names_the_tensor(base, tmp_path):
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"

    def poison(state):
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")

    message = _refused(NonFiniteWeightError, "1 NaN/Inf values", _with(base, tmp_path, "nan.safetensors", poison))
    assert key in message


def test_overflow_into_requested_dtype(base, tmp_path):
    def huge(state):
        state["first_stage_model.decoder.conv_out.bias"] = torch.full_like(
            state["first_stage_model.decoder.conv_out.bias"], 1e6)

    path = _with(base, tmp_path, "huge.safetensors", huge)
    message = _refused(NonFiniteWeightError, "overflow torch.float16", path, dtype=torch.float32,
                       vae_dtype=torch.float16)
    assert "weight_dtype bf16 or fp32" in message  # the loader node's own words
    load_checkpoint(path, dtype=torch.float32, vae_dtype=torch.float32)  # fine where it fits


def test_strict_report_lists_missing_unexpected_and_misshaped(base, tmp_path):
    def damage(state):
        del state["model.diffusion_model.out.2.bias"]
        state["model.diffusion_model.extra.weight"] = torch.zeros(3)
        state["first_stage_model.quant_conv.bias"] = torch.zeros(5)

    message = _refused(StateDictMismatchError, "does not match", _with(base, tmp_path, "bad.safetensors", damage))
    assert "1 missing: model.diffusion_model.out.2.bias" in message
    assert "1 unexpected: model.diffusion_model.extra.weight" in message
    assert "first_stage_model.quant_conv.bias (expected [8], found [5])" in message
    assert "download it again" in message


def test_unreadable_architecture(base, tmp_path):
    def drop(state):
        del state["model.diffusion_model.label_emb.0.0.weight"]

    message = _refused(StateDictMismatchError, "label_emb.0.0.weight' is missing",
                       _with(base, tmp_path, "noadm.safetensors", drop))
    assert message.startswith("noadm.safetensors: ") and "download it again" in message


def test_diffusers_folder_refusals(base, tmp_path):
    folder = write_diffusers_folder(base, tmp_path / "pipe", shards=2)
    shard = next((folder / "unet").glob("*-00002-of-00002.safetensors"))
    shard.unlink()
    _refused(CorruptCheckpointError, "which is missing", folder)

    pickled = tmp_path / "pickled"
    write_diffusers_folder(base, pickled)
    (pickled / "vae" / "diffusion_pytorch_model.safetensors").rename(pickled / "vae" / "diffusion_pytorch_model.bin")
    _refused(UnsafeFormatError, "only pickle weights", pickled)

    sd15 = tmp_path / "sd15"
    (sd15 / "text_encoder").mkdir(parents=True)
    (sd15 / "unet").mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"],
                                                       "unet": ["diffusers", "UNet2DConditionModel"]}))
    (sd15 / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 768}))
    _refused(WrongArchitectureError, "StableDiffusionPipeline \\(SD 1.x\\)", sd15)


def test_bad_arguments(files):
    with pytest.raises(ValueError, match="expect must be"):
        load_checkpoint(files["base"], expect="xl")
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        load_checkpoint(files["base"], dtype=torch.int8)


def test_unknown_input_channel_variants(tmp_path):
    from dataclasses import replace

    # 9 channels is the inpainting base (tests/sampling/test_inpaint_model.py); 8 is nothing these nodes run.
    config = replace(TINY_BASE, unet=replace(TINY_BASE.unet, in_channels=8))
    path = write_checkpoint(tiny_model(config), tmp_path / "variant.safetensors")
    _refused(WrongArchitectureError, "8-channel UNet input", path)
