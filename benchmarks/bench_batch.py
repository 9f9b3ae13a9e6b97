"""Jobs per second of `python -m sdxl_core batch`: local mode against Ray with 1 and 2 workers, on the tiny checkpoints.

Each mode runs the same jobs through the batch's own pieces (jobs read by its JobReader, run locally or by
`run_on_ray`, every image written by the driver as the command does; the manifest aside) into a fresh folder. The
local Ray instance is started once, before the timings (its start-up is reported on its own); each Ray run still
pays for its actors' start and checkpoint loads, as a real run does.

Per mode: the wall time and jobs per second end to end (actors' start and checkpoint loads included); the start,
from the call to the first job beginning in a worker (the actor processes starting, torch imported); and the
overhead per job, the time after that start not spent in the jobs themselves (their seconds, as the workers report
them, loads included) over the number of jobs: scheduling rows, pickling jobs, shipping the images back, writing
them. The Ray path's per-job overhead is the 1-worker run's against local mode's. Workers and local mode sample with
the same number of threads (--threads), so the comparison is like for like; subtracting each run's own job seconds
keeps a busy machine's slower sampling out of the overhead.

    python3 benchmarks/bench_batch.py --jobs 16 --json batch.json

On a GPU cluster the same comparison is `--device cuda --address auto` against a running cluster; the tiny models
then measure mostly the overhead, which is what this benchmark is for.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sdxl_core.app.batch import _run_locally, _write  # noqa: E402
from sdxl_core.app.batch_jobs import JobReader  # noqa: E402
from sdxl_core.app.batch_ray import RayOptions, run_on_ray  # noqa: E402
from sdxl_core.app.batch_worker import RunSettings  # noqa: E402
from sdxl_core.app.demo import demo_checkpoints  # noqa: E402


def _measure(outcomes, out: Path, workers: int) -> dict:
    """Write each outcome's images as it arrives, as the batch command does, and account for the time."""
    out.mkdir(parents=True)
    called, started = time.time(), time.perf_counter()
    job_seconds, first_start = [], None
    for outcome in outcomes:
        if outcome.error is not None:
            raise RuntimeError(f"line {outcome.job.line} failed: {outcome.error}")
        _write(outcome, out)
        job_seconds.append(outcome.seconds)
        first_start = min(first_start or outcome.started_at, outcome.started_at)
    wall_s = time.perf_counter() - started
    start_s = first_start - called
    count = len(job_seconds)
    return {"wall_s": wall_s, "jobs_per_s": count / wall_s, "start_s": start_s,
            "jobs_per_s_after_start": count / (wall_s - start_s), "job_s": sum(job_seconds) / count,
            "median_job_s": statistics.median(job_seconds),  # without the first jobs' checkpoint loads
            # the workers' job seconds overlap: each worker's share of the wall time is theirs over the workers
            "overhead_s_per_job": (wall_s - start_s - sum(job_seconds) / workers) / count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=16, help="jobs each mode runs (default 16)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="steps per image, the refiner taking the last")
    parser.add_argument("--threads", type=int, default=1, help="torch threads locally and CPU cores per Ray worker")
    parser.add_argument("--device", default="cpu", help="torch device of every worker (default cpu)")
    parser.add_argument("--address", help="a running Ray cluster (default: start a local one with 2 CPUs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    import ray

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    paths = demo_checkpoints(work / "checkpoints")
    defaults = {"base": paths["base"], "refiner": paths["refiner"], "width": args.size, "height": args.size,
                "steps": args.steps, "refiner_start": args.steps - 1, "prompt": "a lighthouse"}
    reader = JobReader(defaults, None)
    jobs = [reader.job(seed + 1, json.dumps({"seed": seed})) for seed in range(args.jobs)]
    settings = RunSettings(device=args.device)
    started = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="WARNING")
    else:
        ray.init(num_cpus=2 * args.threads, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray_start = time.perf_counter() - started
    def on_ray(workers: int):
        return lambda: run_on_ray(jobs, settings, RayOptions(workers=workers, cpus_per_worker=args.threads))

    # name: (how to get the outcomes, how many workers run jobs at once)
    modes = {"local": (lambda: _run_locally(jobs, settings), 1), "ray, 1 worker": (on_ray(1), 1),
             "ray, 2 workers": (on_ray(2), 2)}
    figures: dict = {"jobs": args.jobs, "size": args.size, "steps": args.steps, "threads": args.threads,
                     "device": args.device, "ray_start_s": ray_start, "modes": {}}
    try:
        for index, (mode, (outcomes, workers)) in enumerate(modes.items()):
            figures["modes"][mode] = measured = _measure(outcomes(), work / f"out_{index}", workers)
            print(f"{mode}: {measured}", file=sys.stderr)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    local = figures["modes"]["local"]
    print(f"\n{args.jobs} jobs of {args.size}x{args.size}, {args.steps} steps, {args.threads} thread(s) a worker, "
          f"{args.device}; local Ray start-up {ray_start:.1f} s (not in the figures)")
    print("| mode | wall s | jobs/s | × local | start s | jobs/s after start | × local | s per job in a worker "
          "(median) | overhead s per job |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, measured in figures["modes"].items():
        print(f"| {mode} | {measured['wall_s']:.1f} | {measured['jobs_per_s']:.3f} | "
              f"{measured['jobs_per_s'] / local['jobs_per_s']:.2f} | {measured['start_s']:.1f} | "
              f"{measured['jobs_per_s_after_start']:.3f} | "
              f"{measured['jobs_per_s_after_start'] / local['jobs_per_s_after_start']:.2f} | "
              f"{measured['job_s']:.3f} ({measured['median_job_s']:.3f}) | {measured['overhead_s_per_job']:.3f} |")
    figures["ray_overhead_s_per_job"] = (figures["modes"]["ray, 1 worker"]["overhead_s_per_job"]
                                         - local["overhead_s_per_job"])
    print(f"Ray path's per-job overhead (1 worker against local): {figures['ray_overhead_s_per_job']:.3f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
