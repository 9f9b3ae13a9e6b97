"""The command line's --mask (img2img inpainting) and --controlnet options on tiny checkpoints."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdxl_core.app.cli import main
from sdxl_core.checkpoints.detect import HINT_UNET_HEAD_CHANNELS
from sdxl_core.checkpoints.loading import load_checkpoint
from sdxl_core.conditioning import BaseMicroConditioning
from sdxl_core.config import TINY_BASE_UNET
from sdxl_core.pipeline import decode, encode, encode_base_conditioning
from tests._sampling_helpers import sample_with
from tests.app.test_cli import _generate_args, _img2img_args, _picture
from tests.models.test_controlnet import random_controlnet


@pytest.fixture(scope="module")
def controlnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("controlnet") / "tiny_controlnet.safetensors"
    state = {"control_model." + k: v.contiguous() for k, v in random_controlnet().state_dict().items()}
    save_file(state, str(path), metadata={HINT_UNET_HEAD_CHANNELS: str(TINY_BASE_UNET.num_head_channels)})
    return path


def _mask_picture(path, width=64, height=48):
    """Red channel: the right half repaints; green and blue hold noise that must be ignored."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] = 0
    pixels[:, width // 2:, 0] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_img2img_mask_is_vae_encode_set_latent_noise_mask_ksampler(tiny_checkpoints, tmp_path):
    source, mask = _picture(tmp_path / "in.png"), _mask_picture(tmp_path / "mask.png")
    out = tmp_path / "inpainted.png"
    assert main(_img2img_args(tiny_checkpoints["base"], source, out, "--strength", "1.0", "--mask", str(mask),
                              "--negative", "blurry")) == 0
    written = Image.open(out)
    settings = json.loads(written.text["sdxl_core"])
    assert settings["mask"] == str(mask) and "Mask: mask.png" in written.text["parameters"]

    # The ComfyUI graph, node by node: LoadImage, LoadImageMask (red), VAEEncode, SetLatentNoiseMask, KSampler.
    model = load_checkpoint(tiny_checkpoints["base"], dtype=torch.float32)
    image = torch.from_numpy(np.asarray(Image.open(source).convert("RGB"), dtype=np.float32) / 255.0)[None]
    red = torch.from_numpy(np.asarray(Image.open(mask).getchannel("R"), dtype=np.float32) / 255.0)[None]
    latent = {**encode(model, image), "noise_mask": red.reshape(-1, 1, 48, 64)}
    positive = encode_base_conditioning(model, "a red cube", micro=BaseMicroConditioning(original_size=(48, 64)))
    negative = encode_base_conditioning(model, "blurry", micro=BaseMicroConditioning(original_size=(48, 64)))
    latent = sample_with(model, latent, positive, negative, seed=4, steps=3, cfg=2.5, sampler="euler",
                           scheduler="normal", denoise=1.0)
    expected = (np.clip(255.0 * decode(model, latent)[0].numpy(), 0, 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(written.convert("RGB")), expected)


def test_mask_of_another_size_is_refused(tiny_checkpoints, tmp_path, capsys):
    source, mask = _picture(tmp_path / "in.png"), _mask_picture(tmp_path / "mask.png", width=32)
    out = tmp_path / "out.png"
    assert main(_img2img_args(tiny_checkpoints["base"], source, out, "--mask", str(mask))) == 2
    assert "the inpainting mask is 32x48 pixels but the image is 64x48" in capsys.readouterr().err
    assert not out.exists()


def test_generate_with_a_controlnet_records_it(tiny_checkpoints, controlnet_file, tmp_path):
    control = _picture(tmp_path / "edges.png", 80, 40)  # another size: centre-cropped and resized
    plain, steered = tmp_path / "plain.png", tmp_path / "steered.png"
    assert main(_generate_args(tiny_checkpoints, plain)) == 0
    assert main(_generate_args(tiny_checkpoints, steered, "--controlnet", str(controlnet_file), "--control-image",
                               str(control), "--control-strength", "0.8", "--control-end", "0.7")) == 0
    settings = json.loads(Image.open(steered).text["sdxl_core"])
    assert settings["controlnets"] == [[str(controlnet_file), str(control), 0.8, 0.0, 0.7]]
    assert Image.open(plain).tobytes() != Image.open(steered).tobytes()


@pytest.mark.parametrize("extra, message", [
    (["--controlnet", "a.safetensors"], "1 --controlnet but 0 --control-image"),
    (["--controlnet", "a", "--control-image", "b", "--control-strength", "1", "--control-strength", "2"],
     "2 --control-strength for 1 --controlnet"),
    (["--controlnet", "a", "--control-image", "b", "--control-start", "0.8", "--control-end", "0.2"],
     "comes after --control-end"),
])
def test_control_options_must_pair_up(tiny_checkpoints, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        main(_generate_args(tiny_checkpoints, tmp_path / "x.png", *extra))
    assert message in capsys.readouterr().err


def test_bad_control_inputs_are_sentences(tiny_checkpoints, controlnet_file, tmp_path, capsys):
    source = _picture(tmp_path / "in.png")
    (tmp_path / "notes.png").write_text("not a picture")
    out = tmp_path / "out.png"
    assert main(_generate_args(tiny_checkpoints, out, "--controlnet", str(controlnet_file), "--control-image",
                               str(tmp_path / "notes.png"))) == 2
    assert "--control-image" in capsys.readouterr().err and not out.exists()
    assert main(_img2img_args(tiny_checkpoints["refiner"], source, out, "--controlnet", str(controlnet_file),
                              "--control-image", str(source))) == 2
    assert "made for another UNet" in capsys.readouterr().err and not out.exists()
