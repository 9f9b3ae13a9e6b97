"""benchmarks/memory_two_stage.py keeps working: its tiny default runs both stages in a child and reports each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_memory_benchmark_reports_every_step_of_the_cli_run(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_two_stage.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    steps = [entry["step"] for entry in result["results"]["cli"]["steps"]]
    for step in ("base text", "base unet", "refiner text", "refiner unet", "base vae"):
        assert step in steps
    peaks = [entry["peak_rss"] for entry in result["results"]["cli"]["steps"]]
    assert 0 < max(peaks) <= result["results"]["cli"]["peak_rss"]  # VmHWM is never below a sample
    held = result["weights"]["base"]["held_bytes"]
    assert set(held) == {"unet", "vae", "clip_g", "clip_l"} and all(value > 0 for value in held.values())
    assert "base unet" in done.stdout and "peak resident" in done.stdout


def test_the_full_size_path_says_what_it_would_do_without_writing(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import memory_two_stage
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    folder = tmp_path / "full"
    assert memory_two_stage.main(["--full-size", str(folder), "--dry-run"]) == 0
    printed = capsys.readouterr()
    assert "would write" in printed.err and "sdxl_base_random.safetensors" in printed.out
    assert "--width 256" in printed.out and not folder.exists()


COMFYUI = os.environ.get("COMFYUI_PATH")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
in_comfyui = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to run ComfyUI's paths")


@in_comfyui
def test_the_pack_s_nodes_path_runs_the_example_workflow_in_comfyui(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_two_stage.py"), "--paths", "nodes",
                           "--json", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COMFYUI_PATH": COMFYUI, "COMFYUI_PYTHON": COMFYUI_PYTHON})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["nodes"]
    steps = [entry["step"] for entry in result["steps"]]
    for step in ("base load", "base text", "base unet", "refiner load", "refiner text", "refiner unet", "base vae",
                 "write PNG", "held after the run"):
        assert step in steps
    assert 0 < max(entry["peak_rss"] for entry in result["steps"]) <= result["peak_rss"]


@in_comfyui
def test_comfyui_s_own_graph_is_accepted_by_comfyui_s_validation(tmp_path, tiny_checkpoints):
    """ComfyUI's own path needs full-size files to run; its graph (node names, inputs, links) is checked here by
    ComfyUI's own prompt validation, on files with the checkpoint names it lists."""
    script = f"""
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("memory_two_stage", {str(ROOT / "benchmarks" / "memory_two_stage.py")!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
base, refiner = Path({str(tiny_checkpoints["base"])!r}), Path({str(tiny_checkpoints["refiner"])!r})
execution = bench.start_comfyui(Path({COMFYUI!r}), {{base.parent}}, "cpu", Path({str(tmp_path / "out")!r}), pack=False)
prompt, labels, outputs = bench.validated_graph(execution, "comfyui", base.name, refiner.name, 256, 6, 4)
print("accepted", sorted(node["class_type"] for node in prompt.values()), outputs)
"""
    done = subprocess.run([COMFYUI_PYTHON, "-c", script], capture_output=True, text=True, timeout=600, cwd=COMFYUI)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accepted" in done.stdout
    assert "KSamplerAdvanced" in done.stdout and "CLIPTextEncodeSDXLRefiner" in done.stdout
