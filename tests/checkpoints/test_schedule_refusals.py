"""SDXL-architecture files trained for a schedule these samplers do not run are refused by name, with a sentence
saying what the file is and why; those whose prediction type we do run are read as such. Single files by ComfyUI's
marker keys (and, with COMFYUI_PATH, exactly where ComfyUI's own `SDXL.model_type` tells them apart), diffusers
folders by their scheduler_config.json."""

from __future__ import annotations

import ast
import enum
import json
import types
from pathlib import Path

import pytest
import torch

from sdxl_core.app.inspect import describe
from sdxl_core.checkpoints.detect import config_hints, schedule_marker
from sdxl_core.checkpoints.errors import WrongArchitectureError
from sdxl_core.checkpoints.loading import inspect_checkpoint, load_checkpoint
from sdxl_core.config import TINY_BASE
from tests._checkpoints import single_file_state, tiny_model, write_diffusers_folder, write_tensors
from tests._comfyui_reference import COMFYUI_PATH, requires_comfyui

# The marker sets of the files people meet, as their state dicts hold them (scalars for CosXL's sigmas).
MARKED = {
    "playground_v2_5": {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)},
    "playground_mean_only": {"edm_mean": torch.zeros(1, 4, 1, 1)},
    "cosxl": {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)},
    "cosxl_max_only": {"edm_vpred.sigma_max": torch.tensor(120.0)},
}
WHAT = {"playground_v2_5": "Playground v2.5", "playground_mean_only": "Playground v2.5", "cosxl": "CosXL",
        "cosxl_max_only": "CosXL"}


@pytest.fixture(scope="module")
def base():
    return tiny_model(TINY_BASE, seed=8)


def _file(base, folder: Path, name: str, extra: dict) -> Path:
    return write_tensors(folder / f"{name}.safetensors", {**single_file_state(base), **extra},
                         metadata=config_hints(base.config))


@pytest.mark.parametrize("name", sorted(MARKED))
def test_edm_and_cosxl_files_are_refused_by_name(base, tmp_path, name):
    path = _file(base, tmp_path, name, MARKED[name])
    with pytest.raises(WrongArchitectureError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{name}.safetensors is an SDXL-architecture checkpoint trained for ")
    assert WHAT[name] in message and "discrete schedule" in message and "ComfyUI's own checkpoint loader" in message
    report = describe(path)  # inspect says the same, without raising
    assert not report.loadable and report.kind == "sdxl-other-schedule" and WHAT[name] in report.problems[0]


def test_markers_we_run_are_not_mistaken_for_other_schedules():
    assert schedule_marker(["v_pred", "ztsnr", "model.diffusion_model.out.2.weight"]) is None
    assert schedule_marker(["edm_vpred.sigma_max"])[0] == "edm_vpred.sigma_max"


def _comfyui_model_type():
    """ComfyUI's `supported_models.SDXL.model_type`, lifted out of its class (the module pulls in ComfyUI's whole
    runtime), with its ModelType enum and latent-format stand-in."""
    source = (Path(COMFYUI_PATH) / "comfy" / "supported_models.py").read_text()
    sdxl = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "SDXL")
    method = next(node for node in sdxl.body if isinstance(node, ast.FunctionDef) and node.name == "model_type")
    model_type = enum.Enum("ModelType", "EPS V_PREDICTION V_PREDICTION_EDM EDM")
    scope = {"model_base": types.SimpleNamespace(ModelType=model_type),
             "latent_formats": types.SimpleNamespace(SDXL_Playground_2_5=lambda: None)}
    exec(compile(ast.Module(body=[method], type_ignores=[]), "supported_models.py", "exec"), scope)  # noqa: S102
    owner = types.SimpleNamespace(sampling_settings={}, latent_format=None)
    return lambda state: scope["model_type"](owner, state).name


@requires_comfyui
@pytest.mark.comfyui
def test_refused_exactly_where_comfyui_samples_another_schedule(base, tmp_path):
    """ComfyUI treats the full marker pairs as EDM / V_PREDICTION_EDM and v_pred(+ztsnr) as V_PREDICTION: we refuse
    the former and load the latter as v-prediction. A lone `edm_mean` ComfyUI samples as eps, which is no more right
    for a Playground file than an EDM schedule it does not run: we refuse it too."""
    model_type = _comfyui_model_type()
    cases = {**MARKED, "v_pred": {"v_pred": torch.tensor([])},
             "v_pred_ztsnr": {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, "eps": {}}
    expected = {"playground_v2_5": "EDM", "playground_mean_only": "EPS", "cosxl": "V_PREDICTION_EDM",
                "cosxl_max_only": "V_PREDICTION_EDM", "v_pred": "V_PREDICTION", "v_pred_ztsnr": "V_PREDICTION",
                "eps": "EPS"}
    for name, extra in cases.items():
        assert model_type(extra) == expected[name], name
        report = describe(_file(base, tmp_path, name, extra))
        if name in MARKED:
            assert not report.loadable, name
        else:
            assert report.loadable, (name, report.problems)
            assert report.config.prediction == ("v_prediction" if name.startswith("v_pred") else "eps")
            assert report.config.noise_schedule.zsnr == (name == "v_pred_ztsnr")


def _folder(base, tmp_path: Path, scheduler: dict | None) -> Path:
    folder = write_diffusers_folder(base, tmp_path / "pipeline")
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


@pytest.mark.parametrize("scheduler, what", [
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5, "prediction_type": "epsilon"},
     "an EDM schedule (Playground v2.5)"),
    ({"_class_name": "EDMEulerScheduler", "prediction_type": "v_prediction"}, "CosXL"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "rectified-flow fine-tune"),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "sample"}, "predicts 'sample'"),
])
def test_diffusers_folders_for_other_schedules_are_refused_by_name(base, tmp_path, scheduler, what):
    folder = _folder(base, tmp_path, scheduler)
    with pytest.raises(WrongArchitectureError, match="pipeline") as caught:
        load_checkpoint(folder)
    assert what in str(caught.value)
    assert not describe(folder).loadable


@pytest.mark.parametrize("scheduler, prediction, zsnr", [
    (None, "eps", False),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon"}, "eps", False),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}, "v_prediction", False),
    ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
     "v_prediction", True),
])
def test_diffusers_folders_declare_their_prediction_type_in_the_scheduler(base, tmp_path, scheduler, prediction,
                                                                          zsnr):
    _, config, _ = inspect_checkpoint(_folder(base, tmp_path, scheduler))
    assert (config.prediction, config.noise_schedule.zsnr) == (prediction, zsnr)
