"""SDXL Model Sampling and SDXL RescaleCFG, the pack's counterparts of ComfyUI's ModelSamplingDiscrete and RescaleCFG
on SDXL_MODEL: they patch a new model (the input untouched, the weights shared), the sampler nodes honour the
patches as the command line's flags and the file's markers do, and the whole node chain samples as ComfyUI's
ModelSamplingDiscrete + RescaleCFG + KSampler sample the same UNet."""

import math

import pytest
import torch

from nodes import comfy_host
from sdxl_core.sampling.model_sampling import rescale_cfg_for, with_rescale_cfg
from tests._comfyui_reference import requires_comfyui
from tests._nodes_helpers import model_folders, node, node_class, use_folders

STEPS = 4


@pytest.fixture(scope="module")
def base(tiny_checkpoints, tmp_path_factory):
    use_folders(model_folders(tmp_path_factory.mktemp("models"), tiny_checkpoints))
    model, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    yield model
    comfy_host.set_standalone_model_folders({})


@pytest.fixture(scope="module")
def conds(base):
    return (node("TextEncodeBase").encode(base, "a red cube", "", "encode")[0],
            node("TextEncodeBase").encode(base, "blurry", "", "encode")[0])


def _latent():
    return node("EmptyLatent").generate("custom", 64, 64, 1)[0]


def _sample(model, conds, sampler="euler", cfg=5.0, seed=5):
    return node("BaseSampler").sample(model, *conds, _latent(), seed, STEPS, cfg, sampler, "karras",
                                      end_at_step=STEPS)[0]["samples"]


def _shares_the_weights(patched, model) -> bool:
    """The loader leaves the networks in the file (nodes/loaders.py): a patched model holds nothing of its own, reads
    what the input would read from the same file, and shares whatever the input holds in memory."""
    return (patched.resident_components() == model.resident_components()
            and all(patched.component(name) is model.component(name) for name in model.resident_components())
            and all(patched.can_release(name) == model.can_release(name) for name in model.component_names))


def test_model_sampling_node_patches_a_new_model_sharing_the_weights(base):
    (vpred,) = node("ModelSamplingDiscrete").patch(base, "v_prediction", True)
    assert (vpred.config.prediction, vpred.config.noise_schedule.zsnr) == ("v_prediction", True)
    assert (base.config.prediction, base.config.noise_schedule.zsnr) == ("eps", False)  # the input untouched
    assert _shares_the_weights(vpred, base) and not vpred.is_resident("unet")
    (back,) = node("ModelSamplingDiscrete").patch(vpred, "eps", False)
    assert back.config == base.config
    with pytest.raises(ValueError, match="sampling must be one of"):
        node("ModelSamplingDiscrete").patch(base, "lcm", False)
    with pytest.raises(ValueError, match="needs an SDXL model"):
        node("ModelSamplingDiscrete").patch(object(), "eps", False)


def test_rescale_cfg_node_patches_the_multiplier_and_refuses_bad_values(base):
    assert node_class("RescaleCFG").INPUT_TYPES()["required"]["multiplier"][1]["default"] == 0.7  # ComfyUI's
    (patched,) = node("RescaleCFG").patch(base, 0.7)
    assert patched.rescale_cfg == 0.7 and base.rescale_cfg == 0.0 and _shares_the_weights(patched, base)
    assert node("RescaleCFG").patch(patched, 0.3)[0].rescale_cfg == 0.3  # a second patch replaces the first
    # The patch survives the other model-to-model steps (a prediction override, a LoRA merge's replace).
    assert node("ModelSamplingDiscrete").patch(patched, "v_prediction", True)[0].rescale_cfg == 0.7
    assert patched.replace(unet=patched.unet).rescale_cfg == 0.7
    assert "multiplier must be a finite number" in node_class("RescaleCFG").VALIDATE_INPUTS(multiplier=math.nan)
    with pytest.raises(ValueError, match="at most 1.0"):
        node("RescaleCFG").patch(base, 1.5)


def test_a_multiplier_set_twice_is_refused_not_silently_dropped(base):
    patched = with_rescale_cfg(base, 0.7)
    assert rescale_cfg_for(patched, 0.0) == 0.7 and rescale_cfg_for(base, 0.5) == 0.5
    assert rescale_cfg_for(patched, 0.7) == 0.7
    with pytest.raises(ValueError, match="RescaleCFG is set twice"):
        rescale_cfg_for(patched, 0.5)


def test_the_node_chain_samples_as_the_command_line_settings_do(base, conds):
    """ModelSamplingDiscrete(v_prediction, zsnr) + RescaleCFG(0.7) + the base sampler equals the core's KSampler
    emulation with the prediction override and SamplingSettings.rescale_cfg: one meaning, two doors."""
    from sdxl_core.sampling.ksampler import sample_latent
    from sdxl_core.sampling.model_sampling import with_prediction
    from sdxl_core.sampling.settings import SamplingSettings

    (vpred,) = node("ModelSamplingDiscrete").patch(base, "v_prediction", True)
    (rescaled,) = node("RescaleCFG").patch(vpred, 0.7)
    through_nodes = _sample(rescaled, conds)
    settings = SamplingSettings(seed=5, steps=STEPS, cfg=5.0, sampler="euler", scheduler="karras", rescale_cfg=0.7)
    through_core = sample_latent(with_prediction(base, "v_prediction", True), _latent(), *conds, settings)["samples"]
    assert torch.equal(through_nodes.cpu(), through_core)
    assert not torch.equal(through_nodes, _sample(vpred, conds))  # the patch is not a no-op


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_node_chain_equals_comfyuis_model_sampling_discrete_rescale_cfg_and_ksampler(base, conds, sampler):
    from sdxl_core.sampling.noise import prepare_noise
    from tests._comfyui_ksampler import comfyui_ksampler

    (vpred,) = node("ModelSamplingDiscrete").patch(base, "v_prediction", True)
    (rescaled,) = node("RescaleCFG").patch(vpred, 0.7)
    ours = _sample(rescaled, conds, sampler=sampler)
    latent = _latent()
    expected, _ = comfyui_ksampler(base, *conds, prepare_noise(latent["samples"], 5), sampler=sampler,
                                   scheduler="karras", steps=STEPS, cfg=5.0, seed=5, prediction="v_prediction",
                                   zsnr=True, rescale=0.7)
    assert torch.equal(ours.cpu(), expected), (ours.cpu() - expected).abs().max().item()


def test_generate_records_a_patched_multiplier(base):
    from sdxl_core.pipeline import GenerationRequest, generate

    request = GenerationRequest(prompt="a red cube", width=64, height=64, steps=2, refiner_start=2)
    assert generate(with_rescale_cfg(base, 0.7), None, request).parameters["rescale_cfg"] == 0.7
