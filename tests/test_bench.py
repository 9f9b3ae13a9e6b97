"""benchmarks/bench_sdxl.py in its CPU tiny mode: every section runs, the JSON holds the numbers, and a missing
diffusers is said out loud rather than skipped silently. A smoke test, not a timing test."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sdxl.py"
QUICK = ["--device", "cpu", "--quick", "--threads", "1", "--steps", "2", "--refiner-steps", "1"]


def _load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_sdxl", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_sdxl", module)  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run_covers_every_section(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), *QUICK, "--json", str(out), "--markdown",
                           str(tmp_path / "table.md"), "--compile-reference", "--time-budget-s", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "failed" not in done.stdout, done.stdout[-3000:]
    data = json.loads(out.read_text())
    env = data["environment"]
    assert env["configs"] == "tiny" and env["device"] == "cpu" and env["diffusers"]
    sections = data["sections"]
    memory = sections["memory"]["two_stage"]
    assert memory["ok"] and memory["images_finite"]
    # One UNet at a time even in bookkeeping mode: the tiny budget forces the same evictions as 8 GiB at full size.
    assert "offload base.unet" in memory["load_order"]
    assert memory["plan"]["peak_resident_bytes"] <= memory["plan"]["budget_bytes"]
    for kind in ("base", "refiner"):
        unet = sections["unet"][kind]
        assert unet["eager"]["median_ms"] > 0 and unet["diffusers eager"]["median_ms"] > 0
        assert unet["diffusers eager"]["rel_err_ours_vs_diffusers"] <= 1e-5  # same tensors, same function
    for lever in ("channels_last", "fuse_qkv"):
        assert sections["unet"]["base"][lever]["rel_err_vs_plain"] <= 1e-5
    assert sections["levers"]["base_kept"].keys() == {"fuse_qkv", "channels_last", "attention"}
    assert sections["vae"]["decode"]["diffusers float32"]["rel_err"] <= 1e-5
    two_stage = sections["two_stage"]
    assert two_stage["sampling_and_decode"]["ours"]["median_ms"] > 0
    assert two_stage["sampling_and_decode"]["diffusers"]["median_ms"] > 0
    assert two_stage["pipeline"]["median_ms"] > 0
    assert "| what | implementation | time (ms) | notes |" in (tmp_path / "table.md").read_text()
    assert "## SDXL benchmark: CPU" in done.stdout
    # The budget is spent before the reference compile: it is skipped with a note, and the table is still written.
    assert any(note.startswith("reference compile skipped") for note in data["notes"])
    assert "diffusers compiled" not in sections["unet"]["base"]


@pytest.mark.heavy
def test_compiled_step_is_kept_only_when_it_is_the_fastest(tmp_path):
    """--compile on the CPU (a C++ compiler, minutes): the compile cost is reported, the step the rest of the run
    uses is never slower than plain eager, and a compile that lost is undone rather than left running."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(BENCH), *QUICK, "--compile", "--no-reference", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    for kind in ("base", "refiner"):
        unet = data["sections"]["unet"][kind]
        assert unet["compile_cost_s"] >= 0
        assert unet["best"]["median_ms"] <= unet["eager"]["median_ms"]
        if "compile" not in unet["best"]["settings"]:
            assert any(note.startswith(f"{kind}: compiled is not faster") for note in data["notes"])


def test_missing_diffusers_is_reported_and_ours_still_runs(tmp_path, monkeypatch, capsys):
    bench = _load_bench(monkeypatch)
    monkeypatch.setattr(bench, "diffusers_available", lambda: (False, "ModuleNotFoundError: No module named 'x'"))
    threads = torch.get_num_threads()
    try:
        assert bench.main([*QUICK, "--steps", "1", "--json", str(tmp_path / "b.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "diffusers cannot be imported (ModuleNotFoundError" in printed
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["environment"]["diffusers"] is None
    assert any("reference timings are skipped" in note for note in data["notes"])
    assert "diffusers eager" not in data["sections"]["unet"]["base"]
    assert data["sections"]["unet"]["base"]["eager"]["median_ms"] > 0


def test_cuda_request_without_a_gpu_fails_clearly(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bench = _load_bench(monkeypatch)
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
