"""`describe` / `python -m sdxl_core inspect`: what a file is, from its header, and an exit status that says whether
it loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdxl_core.app.cli import main
from sdxl_core.app.inspect import describe, summarise_components
from sdxl_core.config import TINY_BASE
from tests._checkpoints import (
    single_file_state,
    single_thread,
    tiny_model,
    write_checkpoint,
    write_pickle,
    write_sd15_like,
    write_tensors,
    write_truncated,
    write_vae_file,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)
MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    model = tiny_model(TINY_BASE, seed=6)
    return model, {"base": write_checkpoint(model, folder / "base.safetensors", dtype=torch.bfloat16),
                   "vae": write_vae_file(model.vae, folder / "vae.safetensors", layout="diffusers"),
                   "sd15": write_sd15_like(folder / "sd15.safetensors"),
                   "pickle": write_pickle(folder / "old.ckpt")}


def test_describe_a_loadable_checkpoint(tiny):
    model, files = tiny
    report = describe(files["base"])
    assert report.loadable and report.kind == "sdxl-base" and report.problems == []
    assert report.config == model.config
    counts = {c.name: c.parameters for c in report.components}
    assert counts == {name: sum(p.numel() for p in m.parameters()) for name, m in model.modules().items()}
    assert all(set(c.dtypes) == {"BF16"} for c in report.components)
    assert report.size_bytes == files["base"].stat().st_size


def test_describe_refusals_never_raise(tiny, tmp_path):
    _, files = tiny
    sd15 = describe(files["sd15"])
    assert not sd15.loadable and sd15.kind == "sd1" and "this project runs SDXL" in sd15.problems[0]
    pickle = describe(files["pickle"])
    assert not pickle.loadable and "pickle" in pickle.problems[0]
    cut = describe(write_truncated(files["base"], tmp_path / "cut.safetensors"))
    assert not cut.loadable and "truncated" in cut.problems[0]
    wrong = describe(files["base"], expect="refiner")
    assert not wrong.loadable and "refiner is required" in wrong.problems[0]


def test_check_weights_finds_nan_without_loading(tiny, tmp_path):
    model, _ = tiny
    state = single_file_state(model)
    key = "conditioner.embedders.1.model.ln_final.bias"
    state[key] = state[key].clone()
    state[key][3] = float("inf")
    from sdxl_core.checkpoints.detect import config_hints

    path = write_tensors(tmp_path / "inf.safetensors", state, metadata=config_hints(model.config))
    assert describe(path).loadable  # the header alone cannot see values
    report = describe(path, check_weights=True)
    assert not report.loadable and report.problems == [f"{key} holds 1 NaN/Inf values (of 64)"]


def test_cli_exit_status_and_output(tiny, capsys):
    _, files = tiny
    assert main(["inspect", str(files["base"]), str(files["vae"])]) == 0
    out = capsys.readouterr().out
    assert "loadable as an SDXL checkpoint" in out and "loadable as a separate VAE" in out
    assert "diffusers layout" in out
    assert main(["inspect", str(files["base"]), str(files["sd15"])]) == 1
    assert "NOT loadable" in capsys.readouterr().out
    assert main(["inspect", "--json", str(files["pickle"])]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["loadable"] is False and data["kind"] == "unreadable"


@pytest.mark.parametrize("kind, expected", [
    # docs/architecture.md (computed from the sgm configs): UNet, CLIP-L, bigG with projection, VAE.
    ("base", {"unet": 2_567_463_684, "vae": 83_653_863, "clip_l": 123_060_480, "clip_g": 694_659_840}),
    ("refiner", {"unet": 2_259_526_660, "vae": 83_653_863, "clip_g": 694_659_840}),
])
def test_full_size_parameter_counts_from_the_manifest(kind, expected):
    path = MANIFESTS / f"sdxl_{kind}_manifest.json"
    if not path.is_file():
        pytest.skip("manifests not available")
    manifest = json.loads(path.read_text())
    shapes = {k: tuple(v["shape"]) for k, v in manifest.items()}
    dtypes = {k: getattr(torch, v["dtype"]) for k, v in manifest.items()}
    counts = {c.name: c.parameters for c in summarise_components(shapes, f"sdxl-{kind}", dtypes)}
    assert counts == expected
