"""`python -m sdxl_core batch JOBS.jsonl --out DIR`: many `generate` runs from a JSON-lines file, resumable.

Every image is named from its job's content (sdxl_core/app/batch_jobs.py), so a rerun skips the jobs whose images
are already there and redoes an edited line; images are written under a temporary name and renamed, so a killed run
leaves no partial PNG. DIR/manifest.jsonl gets one object per line as the run goes (`line`, `status` — done,
skipped or failed —, `outputs`, `seed`, `seconds`, `error`). Jobs run in this process (weights loaded once per model
set, jobs grouped by it) or, with --ray, on a Ray cluster (sdxl_core/app/batch_ray.py); either way this process
writes every file. docs/batch.md is the user's guide.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from .batch_jobs import RUN_WIDE, Job, JobError, JobReader, generation_parser, make_defaults_only, read_lines
from .batch_worker import JobOutcome, JobRunner, RunSettings
from .options import _add_generation_arguments
from .progress import ProgressBar
from .runner import _png_text, save_png

MANIFEST = "manifest.jsonl"
LOCAL_CLUSTER = "local"  # --ray without an address: start a Ray instance on this machine


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """The batch command's options: generate's options (defaults for every line), the jobs file, the folder, Ray."""
    parser.description = ("Run generate once per line of JOBS.jsonl. The generate options given here are defaults "
                          "that a line's keys override; rerunning skips the jobs whose images exist.")
    _add_generation_arguments(parser, with_models=True)
    make_defaults_only(parser)
    parser.add_argument("jobs", type=Path, metavar="JOBS.jsonl",
                        help="one JSON object per line, its keys the generate options with underscores, e.g. "
                             '{"prompt": "a red cube", "seed": 3, "batch_size": 2}')
    # generate's --out names one PNG; here it names the folder the images go to.
    out = next(action for action in parser._actions if action.dest == "out")
    out.required, out.default, out.metavar = True, None, "DIR"
    out.help = "folder for the images and manifest.jsonl (created if missing)"
    parser.add_argument("--ray", nargs="?", const=LOCAL_CLUSTER, metavar="ADDRESS",
                        help="run the jobs on a Ray cluster: ADDRESS of a running one (host:6379, auto, "
                             "ray://host:10001), or none for a local one; put it after JOBS.jsonl")
    parser.add_argument("--workers", type=_positive_int,
                        help="Ray: model-holding actors (default: one per GPU, else CPUs / --cpus-per-worker)")
    parser.add_argument("--cpus-per-worker", type=_positive_int,
                        help="Ray: CPU cores per actor on CPU-only clusters (default 4, at most one node's cores)")
    parser.add_argument("--gpus-per-worker", type=_positive_float,
                        help="Ray: GPUs per actor (default 1 when the cluster has GPUs)")


class Manifest:
    """DIR/manifest.jsonl: one JSON object per job of this run, flushed as each job ends so a killed run keeps
    what it did."""

    def __init__(self, path: Path):
        self._stream: TextIO = open(path, "w", encoding="utf-8")

    def record(self, line: int, status: str, *, outputs: Iterable[Path] = (), seed: int | None = None,
               seconds: float = 0.0, error: str | None = None, **extra) -> None:
        entry = {"line": line, "status": status, "outputs": [str(path) for path in outputs], "seed": seed,
                 "seconds": round(seconds, 3), "error": error, **extra}
        self._stream.write(json.dumps(entry) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def _say(text: str) -> None:
    # Starts a fresh line: the progress bar redraws itself after it.
    print(f"\r{text}", file=sys.stderr)


def _read_jobs(args: argparse.Namespace, manifest: Manifest) -> tuple[list[Job], int]:
    """Every line as a job; a line that is not one is reported with its number, recorded as failed and skipped."""
    given = {dest: value for dest, value in vars(args).items()
             if dest in _generation_dests() and dest not in RUN_WIDE}
    reader = JobReader(given, getattr(args, "dtype", None))
    jobs, malformed = [], 0
    for number, text in read_lines(args.jobs):
        try:
            jobs.append(reader.job(number, text))
        except JobError as error:
            malformed += 1
            _say(f"line {number}: {error}; skipped")
            manifest.record(number, "failed", error=str(error))
    return jobs, malformed


def _generation_dests() -> set[str]:
    return {action.dest for action in generation_parser(add_help=False)._actions}


def _grouped(jobs: list[Job]) -> list[Job]:
    """Jobs ordered so that those sharing a model set are consecutive (sets in order of first appearance, lines in
    file order within a set): each set's checkpoints are then loaded once."""
    first_seen: dict = {}
    for job in jobs:
        first_seen.setdefault(job.models, len(first_seen))
    return sorted(jobs, key=lambda job: (first_seen[job.models], job.line))


def _plan(jobs: list[Job], out: Path, manifest: Manifest) -> list[Job]:
    """The jobs still to run: those whose images all exist are recorded as skipped, as are repeats of a line."""
    pending, names = [], {}
    for job in jobs:
        outputs = job.outputs(out)
        if job.name in names:
            manifest.record(job.line, "skipped", outputs=outputs, seed=job.request.seed, same_as=names[job.name])
        elif all(path.exists() for path in outputs):
            manifest.record(job.line, "skipped", outputs=outputs, seed=job.request.seed)
        else:
            pending.append(job)
        names.setdefault(job.name, job.line)
    return _grouped(pending)


def _write(outcome: JobOutcome, out: Path) -> list[Path]:
    """The job's PNGs as `generate` writes them (same pixels, same text chunks), each renamed into place whole."""
    request = outcome.job.request
    details = f"Size: {request.width}x{request.height}, Refiner start: {request.refiner_start}"
    text = _png_text(outcome.parameters, details, outcome.job.sources())
    return save_png(outcome.images, outcome.job.outputs(out)[0], text)


def _run_locally(jobs: list[Job], settings: RunSettings) -> Iterator[JobOutcome]:
    runner = JobRunner(settings)
    for job in jobs:
        yield runner.run(job)


def run_batch(args: argparse.Namespace, *, ray_worker: type | None = None) -> int:
    """The batch command; `ray_worker`: the Ray actor class, when not batch_ray.BatchWorker (fault-injection
    tests subclass it)."""
    if not args.jobs.is_file():
        print(f"error: the jobs file {args.jobs} does not exist", file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out names the batch's folder, but {args.out} is a file", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for leftover in args.out.glob("*.partial"):  # an image a killed run was writing: its job runs again
        leftover.unlink()
    settings = RunSettings(device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                           low_vram=getattr(args, "low_vram", False))
    manifest = Manifest(args.out / MANIFEST)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    try:
        jobs, counts["failed"] = _read_jobs(args, manifest)
        pending = _plan(jobs, args.out, manifest)
        counts["skipped"] = len(jobs) - len(pending)
        if args.ray is not None:
            from .batch_ray import RayOptions, run_on_ray

            address = None if args.ray == LOCAL_CLUSTER else args.ray
            options = RayOptions(address, args.workers, args.cpus_per_worker, args.gpus_per_worker)
            outcomes = run_on_ray(pending, settings, options, ray_worker)
        else:
            outcomes = _run_locally(pending, settings)
        return _collect(outcomes, pending, args.out, manifest, counts)
    except (ValueError, RuntimeError) as error:  # the run could not start (bad --device, no Ray, cluster gone)
        print(f"\nerror: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncancelled; the images written so far are kept and a rerun skips them", file=sys.stderr)
        return 130
    finally:
        manifest.close()


def _collect(outcomes: Iterator[JobOutcome], pending: list[Job], out: Path, manifest: Manifest,
             counts: dict[str, int]) -> int:
    """Write each job's images as its outcome arrives and record it; a job delivered twice (a retried Ray task
    repeating finished work) is written once."""
    bar = ProgressBar(total=len(pending), label="jobs", unit="jobs") if pending else None
    handled: set[str] = set()
    for outcome in outcomes:
        job = outcome.job
        if job.name in handled:
            continue
        handled.add(job.name)
        if outcome.error is None:
            started = time.perf_counter()
            try:
                outputs = _write(outcome, out)
            except OSError as error:
                outcome.error = f"could not write the image into {out}: {error}"
            else:
                counts["done"] += 1
                manifest.record(job.line, "done", outputs=outputs, seed=job.request.seed,
                                seconds=outcome.seconds + time.perf_counter() - started)
        if outcome.error is not None:
            counts["failed"] += 1
            _say(f"line {job.line}: {outcome.error}")
            manifest.record(job.line, "failed", seed=job.request.seed, seconds=outcome.seconds,
                            error=outcome.error)
        bar.advance()
    missing = [job.line for job in pending if job.name not in handled]
    if missing:
        raise RuntimeError(f"the workers returned no result for lines {missing}; rerun to do them")
    print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed; "
          f"manifest: {out / MANIFEST}")
    return 1 if counts["failed"] else 0
