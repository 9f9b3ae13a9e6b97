"""The prediction type of a checkpoint: read from ComfyUI's `v_pred` / `ztsnr` marker keys, written back on save,
overridable, and sampled as ComfyUI samples it."""

import pytest
import torch
from safetensors import safe_open

from sdxl_core.checkpoints.detect import config_hints, prediction_from_keys
from sdxl_core.checkpoints.loading import inspect_checkpoint, load_checkpoint, save_checkpoint
from sdxl_core.config import TINY_BASE
from sdxl_core.sampling.model_sampling import model_sampling_for, with_prediction
from tests._checkpoints import single_file_state, tiny_model, write_tensors
from tests._comfyui_reference import KDiffusionModelStub, requires_comfyui


@pytest.fixture(scope="module")
def base():
    return tiny_model(TINY_BASE, seed=4)


def _with_markers(base, path, *markers):
    state = single_file_state(base)
    state.update({marker: torch.tensor([]) for marker in markers})
    return write_tensors(path, state, metadata=config_hints(base.config))


def test_markers_as_comfyui_reads_them():
    assert prediction_from_keys(["a"]) == ("eps", False)
    assert prediction_from_keys(["v_pred"]) == ("v_prediction", False)
    assert prediction_from_keys(["v_pred", "ztsnr"]) == ("v_prediction", True)
    assert prediction_from_keys(["ztsnr"]) == ("eps", False)  # ztsnr counts only with v_pred, as in ComfyUI


@pytest.mark.parametrize("markers, prediction, zsnr", [((), "eps", False), (("v_pred",), "v_prediction", False),
                                                       (("v_pred", "ztsnr"), "v_prediction", True)])
def test_load_inspect_save_round_trip(base, tmp_path, markers, prediction, zsnr):
    path = _with_markers(base, tmp_path / "model.safetensors", *markers)
    _, config, report = inspect_checkpoint(path)
    assert (config.prediction, config.noise_schedule.zsnr) == (prediction, zsnr)
    assert not report.unexpected  # the markers are read, not reported as stray weights
    model = load_checkpoint(path, dtype=torch.float32)
    assert model.config == config
    saved = tmp_path / "saved.safetensors"
    save_checkpoint(model, saved)
    with safe_open(saved, "pt") as handle:
        assert {key for key in handle.keys() if key in ("v_pred", "ztsnr")} == set(markers)
    assert load_checkpoint(saved, dtype=torch.float32).config == config


def test_override_like_comfyuis_model_sampling_discrete(base):
    vpred = with_prediction(base, "v_prediction", zsnr=True)
    assert vpred.unet is base.unet and base.config.prediction == "eps"
    sampling = model_sampling_for(vpred.config)
    assert sampling.prediction == "v_prediction" and sampling.schedule.sigma_max > 4000
    assert with_prediction(vpred, zsnr=False).config.noise_schedule.zsnr is False
    with pytest.raises(ValueError, match="prediction must be one of eps, v_prediction"):
        with_prediction(base, "x0")


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde"])
def test_vpred_zsnr_checkpoint_samples_as_comfyui_samples_it(base, tmp_path, sampler):
    """A tiny checkpoint with both markers, loaded and run through the KSampler emulation with RescaleCFG 0.7,
    equals ComfyUI's ModelSamplingDiscrete(zsnr=True) + V_PREDICTION around the same UNet with its RescaleCFG
    function and its own sampler, from the same seeded noise."""
    from sdxl_core.conditioning import BaseMicroConditioning
    from sdxl_core.pipeline import empty_latent, encode_base_conditioning
    from sdxl_core.sampling.ksampler import guided_denoiser, sample_latent
    from sdxl_core.sampling.noise import prepare_noise
    from sdxl_core.sampling.schedules import ksampler_sigmas
    from sdxl_core.sampling.settings import SamplingSettings
    from tests._comfyui_reference import lift, model_sampling_v, rescale_cfg_function
    from tests.sampling.test_samplers import comfyui_sample

    model = load_checkpoint(_with_markers(base, tmp_path / "vpred.safetensors", "v_pred", "ztsnr"),
                            dtype=torch.float32)
    micro = BaseMicroConditioning((64, 64))
    positive = encode_base_conditioning(model, "a red cube", micro=micro)
    negative = encode_base_conditioning(model, "blurry", micro=micro)
    settings = SamplingSettings(seed=5, steps=6, cfg=5.0, sampler=sampler, scheduler="karras", rescale_cfg=0.7)
    latent = empty_latent(64, 64)
    ours = sample_latent(model, latent, positive, negative, settings)["samples"]

    reference = model_sampling_v(zsnr=True)
    cfg_function = lift("comfy/samplers.py", "cfg_function")["cfg_function"]
    guided = guided_denoiser(model, positive, negative, 5.0, (8, 8))
    cond, uncond = guided.cond[0].cond, guided.uncond[0].cond
    rescale = rescale_cfg_function(0.7)

    class ComfyModel(KDiffusionModelStub):
        def __call__(self, x, sigma, model_options=None, **kwargs):
            batch = x.shape[0]
            both = {key: torch.cat([cond[key].expand(batch, *cond[key].shape[1:]),
                                    uncond[key].expand(batch, *uncond[key].shape[1:])]) for key in cond}
            x2, sigma2 = torch.cat([x, x]), torch.cat([sigma, sigma])
            x_in = reference.calculate_input(sigma2, x2)
            out = model.unet(x_in, reference.timestep(sigma2).float(), both["context"], both["y"])
            cond_x0, uncond_x0 = reference.calculate_denoised(sigma2, out, x2).split(batch)
            options = {**(model_options or {}), "sampler_cfg_function": rescale}
            return cfg_function(None, cond_x0, uncond_x0, 5.0, x, sigma, model_options=options)

    sigmas = ksampler_sigmas(model_sampling_for(model.config).schedule, "karras", sampler, 6)
    scale = model.config.vae.scale_factor
    noise = prepare_noise(latent["samples"], 5)
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)  # ComfyUI's max-denoise noise scaling
    with torch.inference_mode():
        expected = comfyui_sample(sampler, ComfyModel(None, reference), x, sigmas, 5) / scale
    assert torch.equal(ours, expected), (ours - expected).abs().max().item()
