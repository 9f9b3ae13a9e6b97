import math

import pytest
import torch

from sdxl_core.sampling.denoiser import EpsDenoiser
from sdxl_core.sampling.schedules import DiscreteSchedule
from tests._comfyui_reference import load_modules, requires_comfyui

SCHEDULE = DiscreteSchedule()


class RecordingModel:
    """An eps model that returns a fixed eps and remembers what it was called with."""

    def __init__(self, eps):
        self.eps = eps
        self.calls = []

    def __call__(self, x_in, t, **cond):
        self.calls.append((x_in, t, cond))
        return self.eps.to(x_in.dtype)


def test_eps_scaling_and_timestep_by_hand():
    x = torch.full((2, 4, 2, 2), 3.0)
    eps = torch.full((2, 4, 2, 2), 0.5)
    model = RecordingModel(eps)
    sigma = SCHEDULE.sigmas[[200, 999]]
    x0 = EpsDenoiser(model, SCHEDULE)(x, sigma, context=torch.ones(2, 77, 8))
    x_in, t, cond = model.calls[0]
    assert t.tolist() == [200.0, 999.0] and t.dtype == torch.float32
    assert x_in[0].flatten()[0].item() == pytest.approx(3.0 / math.sqrt(0.571666**2 + 1), rel=1e-5)
    assert x_in[1].flatten()[0].item() == pytest.approx(3.0 / math.sqrt(14.614641**2 + 1), rel=1e-5)
    assert x0[0].flatten()[0].item() == pytest.approx(3.0 - 0.571666 * 0.5, rel=1e-5)
    assert x0[1].flatten()[0].item() == pytest.approx(3.0 - 14.614641 * 0.5, rel=1e-5)
    assert set(cond) == {"context"}


def test_sigma_between_training_sigmas_maps_to_the_nearest_in_log():
    model = RecordingModel(torch.zeros(1, 4, 2, 2))
    denoiser = EpsDenoiser(model, SCHEDULE)
    x = torch.zeros(1, 4, 2, 2)
    denoiser(x, torch.tensor([0.5704]))  # between sigma(199)=0.569285 and sigma(200)=0.571666
    denoiser(x, torch.tensor(14.0))  # a scalar sigma is broadcast to the batch
    nearest_to_14 = int(torch.argmin((SCHEDULE.sigmas.double().log() - math.log(14.0)).abs()))
    assert [call[1].tolist() for call in model.calls] == [[199.0], [float(nearest_to_14)]]
    assert model.calls[1][1].shape == (1,)


def test_compute_dtype_casts_inputs_and_returns_float32():
    model = RecordingModel(torch.full((1, 4, 2, 2), 0.25))
    denoiser = EpsDenoiser(model, SCHEDULE, dtype=torch.bfloat16)
    x = torch.ones(1, 4, 2, 2)
    x0 = denoiser(x, torch.tensor([1.0]), context=torch.ones(1, 77, 8), y=torch.ones(1, 16),
                  mask=torch.ones(1, 3, dtype=torch.long))
    x_in, _, cond = model.calls[0]
    assert x_in.dtype == cond["context"].dtype == cond["y"].dtype == torch.bfloat16
    assert cond["mask"].dtype == torch.long
    assert x0.dtype == torch.float32
    assert torch.allclose(x0, torch.full_like(x, 1.0 - 0.25 * 1.0))


def test_bad_shapes_are_refused():
    denoiser = EpsDenoiser(RecordingModel(torch.zeros(1, 4, 2, 2)), SCHEDULE)
    with pytest.raises(ValueError, match="one value per batch item"):
        denoiser(torch.zeros(2, 4, 2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="returned eps of shape"):
        denoiser(torch.zeros(2, 4, 2, 2), torch.ones(2))


@requires_comfyui
@pytest.mark.comfyui
def test_bit_equal_to_comfyui_eps_apply_model():
    modules = load_modules()
    ms = modules.model_sampling

    class ModelSamplingEps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    reference = ModelSamplingEps()

    def eps_model(x_in, t):
        return torch.sin(x_in * 3.0) + t.view(-1, 1, 1, 1) / 1000.0

    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.tensor([14.6146, 0.7, 0.0301])
    x_in = reference.calculate_input(sigma, x)
    expected = reference.calculate_denoised(sigma, eps_model(x_in, reference.timestep(sigma).float()), x)
    assert torch.equal(EpsDenoiser(lambda xi, t: eps_model(xi, t), SCHEDULE)(x, sigma), expected)
