"""v-prediction, zero terminal SNR and RescaleCFG against ComfyUI's ModelSamplingDiscrete(zsnr=True) with
V_PREDICTION and its RescaleCFG node, on a toy network."""

import pytest
import torch

from sdxl_core.config import NoiseScheduleConfig
from sdxl_core.sampling.denoiser import VDenoiser
from sdxl_core.sampling.guidance import CFGDenoiser
from sdxl_core.sampling.model_sampling import ModelSampling
from sdxl_core.sampling.samplers import integrate
from sdxl_core.sampling.schedules import DiscreteSchedule, ksampler_sigmas
from tests._comfyui_reference import GuidedModelStub, model_sampling_v, requires_comfyui, rescale_cfg_function
from tests.sampling.test_samplers import comfyui_sample

ZSNR = DiscreteSchedule(NoiseScheduleConfig(zsnr=True))


def toy_network(x_in, t, y):
    """A non-linear stand-in for the UNet: its output depends on the input, the timestep and the condition."""
    return 0.6 * torch.tanh(x_in) + 0.3 * y.view(-1, 1, 1, 1) * torch.cos(t.view(-1, 1, 1, 1) / 300.0)


def test_zero_terminal_snr_schedule():
    plain = DiscreteSchedule()
    assert ZSNR.sigmas[0] == plain.sigmas[0]  # the first step keeps its noise level
    # The last step is (almost) pure noise: alpha_bar = 4.9e-8 instead of 0.0047.
    assert ZSNR.sigma_max.item() == pytest.approx(((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08) ** 0.5,
                                                  rel=1e-6)
    assert torch.all(ZSNR.sigmas[1:] > ZSNR.sigmas[:-1])


def test_v_denoiser_inverts_the_v_target():
    """With the true v = alpha eps - sigma_vp x0 as output, the denoiser returns x0."""
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigma = torch.tensor([0.5, 7.0])
    s = sigma.view(-1, 1, 1, 1)
    alpha, sigma_vp = 1 / (s**2 + 1) ** 0.5, s / (s**2 + 1) ** 0.5
    x = x0 + s * eps
    v = alpha * eps - sigma_vp * x0
    denoiser = VDenoiser(lambda x_in, t: v, DiscreteSchedule())
    assert torch.allclose(denoiser(x, sigma), x0, atol=1e-5)


@requires_comfyui
@pytest.mark.comfyui
def test_schedules_equal_comfyuis_model_sampling_discrete():
    for zsnr in (False, True):
        reference = model_sampling_v(zsnr=zsnr)
        ours = DiscreteSchedule(NoiseScheduleConfig(zsnr=zsnr))
        assert torch.equal(reference.sigmas, ours.sigmas) and torch.equal(reference.log_sigmas, ours.log_sigmas)
        assert reference.percent_to_sigma(0.3) == ours.percent_to_sigma(0.3)


@requires_comfyui
@pytest.mark.comfyui
@pytest.mark.filterwarnings("ignore:Should have:UserWarning")
@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("cfg", [1.0, 5.0])
@pytest.mark.parametrize("zsnr", [False, True])
@pytest.mark.parametrize("sampler, scheduler", [("euler", "karras"), ("euler_ancestral", "normal"),
                                                ("dpmpp_2m_sde", "karras"), ("euler_cfg_pp", "sgm_uniform")])
def test_v_prediction_samples_equal_comfyuis(sampler, scheduler, zsnr, cfg, rescale):
    """Our v denoiser over the (zsnr) schedule, guided with RescaleCFG, against ComfyUI's V_PREDICTION model
    sampling, its `_apply_model` input/output scalings and the RescaleCFG node's cfg function."""
    reference = model_sampling_v(zsnr=zsnr)
    ours = ModelSampling("v_prediction", DiscreteSchedule(NoiseScheduleConfig(zsnr=zsnr)))

    def comfy_inner(x, sigma, y):  # ComfyUI `BaseModel._apply_model`
        x_in = reference.calculate_input(sigma, x)
        return reference.calculate_denoised(sigma, toy_network(x_in, reference.timestep(sigma).float(), y), x)

    cond_y, uncond_y = torch.tensor([[1.0]]), torch.tensor([[-0.5]])
    options = {"sampler_cfg_function": rescale_cfg_function(rescale)} if rescale else {}
    sigmas = ksampler_sigmas(ours.schedule, scheduler, sampler, 8)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2)) * (1 + sigmas[0] ** 2) ** 0.5
    comfy_model = GuidedModelStub(comfy_inner, cond_y, uncond_y, cfg, reference, model_options=options)
    expected = comfyui_sample(sampler, comfy_model, x, sigmas, 9)

    guided = CFGDenoiser(ours.denoiser(toy_network), {"y": cond_y}, {"y": uncond_y}, cfg, rescale=rescale)
    got = integrate(sampler, guided, x, sigmas, seed=9, schedule=ours.schedule)
    assert torch.equal(got, expected), (got - expected).abs().max().item()
