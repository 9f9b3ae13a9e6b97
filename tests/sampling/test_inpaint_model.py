"""9-channel SDXL inpainting UNets: they load (single file and diffusers folder) and get the mask and masked-image
channels exactly as ComfyUI's `BaseModel.concat_cond` builds them."""

import ast
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdxl_core.checkpoints.loading import load_checkpoint
from sdxl_core.config import TINY_BASE
from sdxl_core.pipeline import encode_base_conditioning
from sdxl_core.sampling.denoiser import EpsDenoiser
from sdxl_core.sampling.guidance import CFGDenoiser, WeightedConditioning
from sdxl_core.sampling.inpaint import InpaintConcat, prepare_denoise_mask
from sdxl_core.sampling.noise import prepare_noise
from sdxl_core.sampling.schedules import DiscreteSchedule, ksampler_sigmas
from tests._checkpoints import tiny_model, write_checkpoint, write_diffusers_folder
from tests._comfyui_reference import COMFYUI_PATH, lift, requires_comfyui
from tests._sampling_helpers import sample_with
from tests.sampling.test_inpaint import comfy_inpaint, pixel_mask

INPAINT_BASE = replace(TINY_BASE, unet=replace(TINY_BASE.unet, in_channels=9))
SCALE = TINY_BASE.vae.scale_factor


@pytest.fixture(scope="module")
def inpaint_model():
    return tiny_model(INPAINT_BASE, seed=4)


def test_inpainting_base_loads_from_a_single_file_and_a_diffusers_folder(inpaint_model, tmp_path):
    single = load_checkpoint(write_checkpoint(inpaint_model, tmp_path / "inpaint.safetensors", dtype=None))
    assert single.config.unet.in_channels == 9 and single.kind == "base"
    folder = write_diffusers_folder(inpaint_model, tmp_path / "sdxl-inpainting-0.1")
    from_folder = load_checkpoint(folder)
    assert from_folder.config.unet.in_channels == 9
    for a, b in zip(single.unet.state_dict().values(), from_folder.unet.state_dict().values()):
        assert torch.equal(a, b)


def _comfy_concat_cond():
    """BaseModel.concat_cond and set_inpaint from comfy/model_base.py, run on a stand-in `self`."""
    source = (Path(COMFYUI_PATH) / "comfy/model_base.py").read_text()
    base_model = next(node for node in ast.parse(source).body if getattr(node, "name", None) == "BaseModel")
    methods = [node for node in base_model.body if getattr(node, "name", None) in ("concat_cond", "set_inpaint")]
    utils = lift("comfy/utils.py", "common_upscale", "resize_to_batch_size", "bislerp", "lanczos")
    scope = {"torch": torch, "utils": types.SimpleNamespace(**utils)}
    exec(compile(ast.Module(body=methods, type_ignores=[]), "model_base.py", "exec"), scope)  # noqa: S102
    model = types.SimpleNamespace(concat_keys=(), process_latent_in=lambda latent: latent * SCALE)
    scope["set_inpaint"](model)
    return lambda **kwargs: scope["concat_cond"](model, **kwargs)


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.parametrize("source", ["noise_mask", "inpaint_model_conditioning", "no_mask"])
def test_concat_channels_equal_comfyui(source):
    concat_cond = _comfy_concat_cond()
    generator = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 4, 8, 8, generator=generator) * SCALE
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    options, denoise_mask = {}, None
    if source == "noise_mask":
        denoise_mask = prepare_denoise_mask(pixel_mask(batch=2), latent.shape)
    elif source == "inpaint_model_conditioning":
        options = {"concat_latent_image": torch.randn(1, 4, 12, 8, generator=generator),
                   "concat_mask": pixel_mask(size=64).reshape(1, 1, 64, 64)[..., :, :48]}
    expected = concat_cond(noise=noise, device="cpu", latent_image=latent, denoise_mask=denoise_mask, **options)
    ours = InpaintConcat(latent, denoise_mask, SCALE).for_options(options, "entry")
    assert ours.shape == (2, 5, 8, 8)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@requires_comfyui
@pytest.mark.comfyui
def test_inpainting_model_sampling_equals_comfyui(inpaint_model):
    """sample_latent on the 9-channel base = ComfyUI's KSampler path: KSamplerX0Inpaint around a model whose
    input is [scaled x, mask, masked latent] with ComfyUI's own concat channels."""
    concat_cond = _comfy_concat_cond()
    positive, negative = (encode_base_conditioning(inpaint_model, text) for text in ("a cat", ""))
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    latent = {"samples": samples, "noise_mask": pixel_mask()}
    settings = dict(seed=5, steps=4, cfg=4.0, sampler="euler", scheduler="normal")
    ours = sample_with(inpaint_model, latent, positive, negative, **settings)["samples"]

    noise = prepare_noise(samples, 5)
    denoise_mask = prepare_denoise_mask(latent["noise_mask"], samples.shape)
    channels = concat_cond(noise=noise, device="cpu", latent_image=samples * SCALE, denoise_mask=denoise_mask)
    unet = inpaint_model.unet

    def model(x_in, t, context, y):
        return unet(torch.cat([x_in, channels.expand(x_in.shape[0], -1, -1, -1)], dim=1), t, context, y)

    from sdxl_core.conditioning import adm_vector, micro_conditioning_scalars

    def side(conditioning, negative_side):
        context, options = conditioning[0]
        scalars = micro_conditioning_scalars(inpaint_model.config, options, (8, 8), negative=negative_side)
        return [WeightedConditioning({"context": context, "y": adm_vector(options["pooled_output"], scalars)})]

    guided = CFGDenoiser(EpsDenoiser(model, DiscreteSchedule(), dtype=torch.float32), side(positive, False),
                         side(negative, True), 4.0)
    sigmas = ksampler_sigmas(DiscreteSchedule(), "normal", "euler", 4)
    with torch.inference_mode():
        expected = comfy_inpaint(guided, samples * SCALE, noise, latent["noise_mask"], sigmas, "euler", seed=5)
    torch.testing.assert_close(ours, expected / SCALE, rtol=1e-6, atol=1e-6)


def test_inpainting_model_keeps_the_unmasked_latent_and_runs_without_a_mask(inpaint_model):
    positive, negative = (encode_base_conditioning(inpaint_model, text) for text in ("a cat", ""))
    samples = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 8, 8)
    mask[..., 4:] = 1.0
    settings = dict(seed=5, steps=3, cfg=4.0, sampler="euler", scheduler="normal")
    out = sample_with(inpaint_model, {"samples": samples, "noise_mask": mask}, positive, negative, **settings)
    torch.testing.assert_close(out["samples"][..., :4], samples[..., :4], rtol=1e-6, atol=1e-6)
    # Without a mask the UNet sees an all-ones mask and the blank image, as in ComfyUI (text-to-image).
    empty = sample_with(inpaint_model, {"samples": torch.zeros(1, 4, 8, 8)}, positive, negative, **settings)
    assert torch.isfinite(empty["samples"]).all()
