"""The estimate before loading: weights from the headers, refusal in a sentence, nothing read for a refused run."""

import pytest
import torch

import sdxl_core.runtime.memory_estimate as memory_estimate
from sdxl_core.app.cli import main
from sdxl_core.checkpoints.loading import load_checkpoint, open_checkpoint
from sdxl_core.pipeline import GenerationRequest, generate
from sdxl_core.runtime.memory_estimate import InsufficientMemoryError, check_generation_fits, estimate_generation
from sdxl_core.runtime.residency import UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL

REQUEST = GenerationRequest(prompt="a lighthouse", width=64, height=64, steps=4, refiner_start=3, cfg=5.0, seed=7)


@pytest.mark.parametrize("storage", [None, torch.float32, torch.bfloat16])
def test_the_header_says_what_each_network_will_weigh(tiny_checkpoints, storage):
    model = open_checkpoint(tiny_checkpoints["base"], storage_dtype=storage)
    predicted = {name: model.weight_bytes(name) for name in model.component_names}
    assert model.resident_components() == ()  # estimating read nothing
    read = load_checkpoint(tiny_checkpoints["base"], storage_dtype=storage)
    assert predicted == {name: read.weight_bytes(name) for name in read.component_names}


def test_each_step_counts_its_own_weights_and_activations(tiny_checkpoints):
    base, refiner = (open_checkpoint(tiny_checkpoints[kind]) for kind in ("base", "refiner"))
    estimate = estimate_generation(base, refiner, 1024, 768, 2, device=torch.device("cpu"), uses_refiner=True)
    steps = {step.label.split(" (")[0]: step for step in estimate.steps}
    assert steps["the base's text encoders"].weights == base.weight_bytes("clip_l") + base.weight_bytes("clip_g")
    unet = steps["the base UNet step"]
    assert unet.weights == base.weight_bytes("unet")
    assert unet.activations == 2 * 2 * 128 * 96 * UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL * 4  # guidance x batch
    assert steps["the refiner UNet step"].weights == refiner.weight_bytes("unet")
    # Networks already in memory are held, not read again: the step adds only its activations.
    _ = base.unet  # reads the UNet into memory
    again = estimate_generation(base, refiner, 1024, 768, 2, device=torch.device("cpu"), uses_refiner=True)
    assert again.steps[1].weights == 0 and again.steps[1].activations == unet.activations


def test_a_run_that_cannot_fit_is_refused_with_both_numbers_and_the_ways_out(tiny_checkpoints, monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_memory", lambda device: 50_000_000)
    base, refiner = (open_checkpoint(tiny_checkpoints[kind], storage_dtype=torch.float32)
                     for kind in ("base", "refiner"))
    request = GenerationRequest(prompt="a lighthouse", width=512, height=512, batch_size=2, steps=4, refiner_start=3)
    with pytest.raises(InsufficientMemoryError) as refused:
        generate(base, refiner, request)
    message = str(refused.value)
    assert "needs about" in message and "but only 50 MB is available, so it was not started" in message
    assert "batch size 1" in message and "--storage-dtype fp16" in message
    assert base.resident_components() == () and refiner.resident_components() == ()  # refused before reading


def test_a_size_no_machine_can_buffer_is_refused_before_any_work(tiny_checkpoints):
    base = open_checkpoint(tiny_checkpoints["base"])
    huge = GenerationRequest(prompt="a lighthouse", width=16384, height=16384, steps=2, refiner_start=2)
    with pytest.raises(InsufficientMemoryError, match=r"the VAE decode \(1 image of 16384x16384\).*a smaller image"):
        generate(base, None, huge)
    assert base.resident_components() == ()


def test_a_run_that_fits_returns_its_estimate(tiny_checkpoints):
    base, refiner = (open_checkpoint(tiny_checkpoints[kind]) for kind in ("base", "refiner"))
    estimate = check_generation_fits(base, refiner, REQUEST)
    assert estimate.fits and estimate.where == "system memory" and estimate.available > 0
    assert [step.label.split(" (")[0] for step in estimate.steps] == [
        "the base's text encoders", "the base UNet step", "the refiner's text encoder", "the refiner UNet step",
        "the VAE decode"]


def test_the_command_line_prints_the_refusal_and_writes_nothing(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_memory", lambda device: 1_000_000)
    out = tmp_path / "x.png"
    code = main(["generate", "--base", str(tiny_checkpoints["base"]), "--refiner", str(tiny_checkpoints["refiner"]),
                 "--prompt", "a cube", "--width", "64", "--height", "64", "--steps", "2", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "so it was not started" in capsys.readouterr().err


def test_available_host_memory_is_a_positive_number_here():
    available = memory_estimate.available_host_memory()
    assert available is None or available > 0
