"""benchmarks/memory_two_stage.py keeps working: its tiny default runs both stages in a child and reports each."""

import json
import subprocess
import sys
from pathlib import Path

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
