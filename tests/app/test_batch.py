"""The batch command: images equal to generate's, locally and on Ray; resumable after a kill; nothing lost or written
twice when a Ray worker dies; bad lines and failing jobs in the manifest."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from sdxl_core.app import runner
from sdxl_core.app.batch import run_batch
from sdxl_core.app.batch_ray import BatchWorker, PoolShape, RayOptions, pool_shape, rows_of_jobs
from sdxl_core.app.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
# Small and quick on the tiny checkpoints; the refiner takes the last of the two steps.
COMMON = ["--width", "32", "--height", "32", "--steps", "2", "--refiner-start", "1", "--cfg", "2.5"]


def _models(paths) -> list[str]:
    return ["--base", str(paths["base"]), "--refiner", str(paths["refiner"])]


def _jobs_file(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _manifest(out: Path) -> list[dict]:
    return [json.loads(text) for text in (out / "manifest.jsonl").read_text().splitlines()]


def _by_line(out: Path) -> dict[int, dict]:
    entries = _manifest(out)
    assert len({entry["line"] for entry in entries}) == len(entries), "a line recorded twice"
    return {entry["line"]: entry for entry in entries}


def _pixels(path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def _generate(paths, out: Path, *options: str) -> Path:
    assert main(["generate", *_models(paths), *COMMON, "--out", str(out), *options]) == 0
    return out


SWEEP = [{"prompt": "a red cube", "seed": 1},
         {"prompt": "a red cube", "seed": 2, "batch_size": 2, "crop_top_left": [4, 8]},
         {"prompt": "a blue cube", "seed": 3, "refiner": None},
         {"prompt": "-a dash first", "seed": 4, "negative": "blur", "original_size": "64x48"}]
SWEEP_OPTIONS = [["--prompt", "a red cube", "--seed", "1"],
                 ["--prompt", "a red cube", "--seed", "2", "--batch-size", "2", "--crop-top-left", "4,8"],
                 None,  # base only: generate without --refiner
                 ["--prompt=-a dash first", "--seed", "4", "--negative", "blur", "--original-size", "64x48"]]


def test_local_batch_equals_generate_and_loads_each_checkpoint_once(tiny_checkpoints, tmp_path, monkeypatch):
    loads = []
    real_load = runner.load_checkpoint
    monkeypatch.setattr(runner, "load_checkpoint", lambda path, **kw: loads.append(Path(path).name) or
                        real_load(path, **kw))
    out = tmp_path / "out"
    jobs = _jobs_file(tmp_path, SWEEP)
    assert main(["batch", str(jobs), "--out", str(out), *_models(tiny_checkpoints), *COMMON]) == 0
    # Three model sets' worth of jobs, two checkpoints: each loaded once (the base-only job reuses the base).
    assert sorted(loads) == ["tiny_sdxl_base.safetensors", "tiny_sdxl_refiner.safetensors"]
    entries = _by_line(out)
    assert [entries[line]["status"] for line in (1, 2, 3, 4)] == ["done"] * 4
    assert len(entries[2]["outputs"]) == 2 and entries[2]["seed"] == 2
    monkeypatch.setattr(runner, "load_checkpoint", real_load)
    for line, options in enumerate(SWEEP_OPTIONS, start=1):
        if options is None:
            reference = tmp_path / "base_only.png"
            assert main(["generate", "--base", str(tiny_checkpoints["base"]), *COMMON, "--prompt", "a blue cube",
                         "--seed", "3", "--out", str(reference)]) == 0
        else:
            reference = _generate(tiny_checkpoints, tmp_path / f"reference_{line}.png", *options)
        references = [reference] + ([reference.with_name(reference.stem + "_1.png")] if line == 2 else [])
        assert [_pixels(path) for path in entries[line]["outputs"]] == [_pixels(path) for path in references]


def test_rerun_skips_finished_jobs_and_redoes_an_edited_line(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    lines = [{"prompt": "a red cube", "seed": 1}, {"prompt": "a red cube", "seed": 2}]
    command = ["batch", str(_jobs_file(tmp_path, lines)), "--out", str(out), *_models(tiny_checkpoints), *COMMON]
    assert main(command) == 0
    first = _by_line(out)
    kept = Path(first[1]["outputs"][0])
    written_at = kept.stat().st_mtime_ns
    lines[1]["seed"] = 5
    _jobs_file(tmp_path, lines)
    assert main(command) == 0
    second = _by_line(out)
    assert second[1]["status"] == "skipped" and second[1]["outputs"] == first[1]["outputs"]
    assert kept.stat().st_mtime_ns == written_at
    assert second[2]["status"] == "done" and second[2]["seed"] == 5
    assert second[2]["outputs"] != first[2]["outputs"]


def test_a_killed_run_leaves_no_partial_image_and_the_rerun_skips_what_it_finished(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    # Two quick jobs, then a slow one (a 512-pixel decode) that is running when the process is killed.
    lines = [{"prompt": "a cube", "seed": 1}, {"prompt": "a cube", "seed": 2},
             {"prompt": "a cube", "seed": 3, "width": 512, "height": 512}] + [
                 {"prompt": "a cube", "seed": seed} for seed in range(4, 7)]
    jobs = _jobs_file(tmp_path, lines)
    command = ["batch", str(jobs), "--out", str(out), *_models(tiny_checkpoints), *COMMON]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "sdxl_core", *command], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = sorted(out.glob("*.png"))
    assert 2 <= len(finished) < len(lines), "the run should have been killed part way"
    for path in finished:  # every PNG present is whole
        with Image.open(path) as image:
            image.load()
    # What a kill in the middle of writing an image leaves: the temporary file, never a .png.
    (out / "stray.png.partial").write_bytes(b"\x89PNG\r\n")
    assert main(command) == 0
    entries = _by_line(out)
    assert sum(entry["status"] == "skipped" for entry in entries.values()) == len(finished)
    assert sum(entry["status"] == "done" for entry in entries.values()) == len(lines) - len(finished)
    assert not list(out.glob("*.partial"))
    assert len(list(out.glob("*.png"))) == len(lines)


def test_bad_lines_and_failing_jobs_are_recorded_and_the_others_run(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    jobs = _jobs_file(tmp_path, [
        {"prompt": "fine", "seed": 1},
        "{not json",
        {"prompt": "typo", "stepz": 3},
        {"prompt": "odd size", "width": 30},
        {"prompt": "missing file", "base": str(tmp_path / "nowhere.safetensors")},
        ["a list"],
        {"prompt": "device", "device": "cpu"},
        {"prompt": "also fine", "seed": 2, "bucket": "1:1", "steps": 1, "refiner_start": 1},
    ])
    assert main(["batch", str(jobs), "--out", str(out), *_models(tiny_checkpoints), *COMMON]) == 1
    entries = _by_line(out)
    assert {line: entry["status"] for line, entry in entries.items()} == {
        1: "done", 2: "failed", 3: "failed", 4: "failed", 5: "failed", 6: "failed", 7: "failed", 8: "done"}
    assert "not a JSON object" in entries[2]["error"]
    assert "unknown key 'stepz'" in entries[3]["error"] and "steps" in entries[3]["error"]
    assert "multiple of 8" in entries[4]["error"]
    assert "nowhere.safetensors" in entries[5]["error"] and entries[5]["outputs"] == []
    assert "expected a JSON object" in entries[6]["error"]
    assert "--device" in entries[7]["error"]
    with Image.open(entries[8]["outputs"][0]) as image:
        assert image.size == (1024, 1024)  # a line's --bucket replaces the command line's --width/--height
    err = capsys.readouterr().err
    assert "line 2:" in err and "line 5:" in err and "Traceback" not in err


def test_command_line_defaults_and_a_line_without_a_prompt(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    jobs = _jobs_file(tmp_path, [{"seed": 1}])
    assert main(["batch", str(jobs), "--out", str(out), *_models(tiny_checkpoints), *COMMON]) == 1
    assert "no prompt for this job" in _manifest(out)[0]["error"]
    assert main(["batch", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ray_missing_says_how_to_install_it(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails as if it were not installed
    jobs = _jobs_file(tmp_path, [{"prompt": "a red cube"}])
    assert main(["batch", str(jobs), "--out", str(tmp_path / "out"), *_models(tiny_checkpoints), *COMMON,
                 "--ray"]) == 2
    assert "pip install 'sdxl-twostage-nodes[ray]'" in capsys.readouterr().err


def test_pool_shape_is_one_actor_per_gpu_or_per_cpu_share():
    gpu_nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert pool_shape({"CPU": 32.0, "GPU": 4.0}, gpu_nodes, RayOptions()) == PoolShape(4, 1, 1.0)
    cpu_nodes = [{"CPU": 8.0}, {"CPU": 4.0}]
    assert pool_shape({"CPU": 12.0}, cpu_nodes, RayOptions()) == PoolShape(3, 4, 0.0)
    assert pool_shape({"CPU": 2.0}, [{"CPU": 2.0}], RayOptions()) == PoolShape(1, 2, 0.0)
    assert pool_shape({"CPU": 2.0}, [{"CPU": 2.0}], RayOptions(cpus_per_worker=1)) == PoolShape(2, 1, 0.0)
    with pytest.raises(ValueError, match="largest node"):
        pool_shape({"CPU": 12.0}, cpu_nodes, RayOptions(cpus_per_worker=10))
    with pytest.raises(ValueError, match="do not fit"):
        pool_shape({"CPU": 2.0}, [{"CPU": 2.0}], RayOptions(workers=3, cpus_per_worker=1))
    with pytest.raises(ValueError, match="more GPUs"):
        pool_shape({"CPU": 8.0}, [{"CPU": 8.0}], RayOptions(gpus_per_worker=1))


def test_rows_hold_one_model_set_each(tiny_checkpoints, tmp_path):
    from sdxl_core.app.batch_jobs import JobReader

    reader = JobReader({"base": tiny_checkpoints["base"], "prompt": "x"}, None)
    jobs = [reader.job(number, json.dumps({"seed": number, "refiner": str(tiny_checkpoints["refiner"])
                                           if number <= 9 else None})) for number in range(1, 12)]
    rows = rows_of_jobs(jobs, workers=2)
    # 9 jobs of one set cut for 2 workers, at most 4 a row; the other set's 2 jobs one a worker
    assert [len(row) for row in rows] == [4, 4, 1, 1, 1]
    assert all(len({job.models for job in row}) == 1 for row in rows)


# --- on a local Ray cluster ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    # Two CPUs bound the cluster whatever the machine; the workers import this tree, not an installed copy.
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _batch_args(jobs: Path, out: Path, paths, *extra: str):
    return build_parser().parse_args(["batch", str(jobs), "--out", str(out), *_models(paths), *COMMON, *extra])


def test_ray_batch_equals_the_local_batch(ray_cluster, tiny_checkpoints, tmp_path):
    jobs = _jobs_file(tmp_path, SWEEP[:3])
    assert run_batch(_batch_args(jobs, tmp_path / "local", tiny_checkpoints)) == 0
    assert run_batch(_batch_args(jobs, tmp_path / "ray", tiny_checkpoints, "--ray", "--workers", "1",
                                 "--cpus-per-worker", "1")) == 0
    local, distributed = _by_line(tmp_path / "local"), _by_line(tmp_path / "ray")
    for line in (1, 2, 3):
        assert distributed[line]["status"] == "done"
        assert [Path(path).name for path in distributed[line]["outputs"]] == [
            Path(path).name for path in local[line]["outputs"]]
        assert [_pixels(path) for path in distributed[line]["outputs"]] == [
            _pixels(path) for path in local[line]["outputs"]]


def _worker_that_dies_once(marker: Path, line: int) -> type:
    """An actor whose process exits in the middle of `line`'s job the first time any actor reaches it."""

    class DiesOnce(BatchWorker):
        def run_job(self, job):
            if job.line == line and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)
            return super().run_job(job)

    return DiesOnce


def test_a_worker_killed_mid_job_still_yields_every_image_once(ray_cluster, tiny_checkpoints, tmp_path):
    jobs = _jobs_file(tmp_path, [{"prompt": "a cube", "seed": seed} for seed in range(1, 5)])
    marker = tmp_path / "died"
    out = tmp_path / "out"
    args = _batch_args(jobs, out, tiny_checkpoints, "--ray", "--workers", "2", "--cpus-per-worker", "1")
    assert run_batch(args, ray_worker=_worker_that_dies_once(marker, line=3)) == 0
    assert marker.exists(), "the fault was not injected"
    entries = _by_line(out)  # each line once
    assert sorted(entries) == [1, 2, 3, 4] and all(entry["status"] == "done" for entry in entries.values())
    outputs = [path for entry in entries.values() for path in entry["outputs"]]
    assert len(set(outputs)) == 4 and sorted(Path(path) for path in outputs) == sorted(out.glob("*.png"))
    reference = _generate(tiny_checkpoints, tmp_path / "reference.png", "--prompt", "a cube", "--seed", "3")
    assert _pixels(entries[3]["outputs"][0]) == _pixels(reference)
