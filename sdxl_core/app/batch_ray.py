"""A batch's jobs on a Ray cluster: Ray Data `map_batches` over a pool of model-holding actors.

The pattern of Ray's "Stable Diffusion Batch Prediction with Ray Data" example
(https://docs.ray.io/en/latest/data/examples/stable_diffusion_inference.html): one actor per GPU (or per N CPU cores
on CPU-only nodes) keeps the checkpoints it loaded between calls. Each dataset row is a run of consecutive jobs of one
model set, so an actor loads a set once and samples several jobs with it; runs are ordered by model set, so the pool
moves through the sets together. The actors send the images back as arrays and the driver writes every file
(sdxl_core/app/batch.py): a node needs no shared disk, and a job a retried task repeats is still written once.

An actor process that dies mid-task is restarted and its task retried: Ray Data's actor pools default to
`max_restarts=-1` and `max_task_retries=-1` (https://docs.ray.io/en/latest/data/api/doc/ray.data.Dataset.map_batches.html).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import pickle
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .batch_jobs import Job
from .batch_worker import JobOutcome, JobRunner, RunSettings

INSTALL_HINT = ("--ray needs Ray Data, which is not installed: pip install 'sdxl-twostage-nodes[ray]' (or "
                "pip install 'ray[data]'), on this machine and on every node of the cluster")
# Jobs per dataset row at most: the row is what a dead actor's retry repeats and what comes back at once, so rows
# stay short even when one model set has thousands of jobs.
MAX_JOBS_PER_ROW = 4
DEFAULT_CPUS_PER_WORKER = 4


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance (unless this process already joined one)
    workers: int | None = None
    cpus_per_worker: int | None = None
    gpus_per_worker: float | None = None


@dataclass(frozen=True)
class PoolShape:
    workers: int
    cpus_per_worker: int
    gpus_per_worker: float


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


def rows_of_jobs(jobs: list[Job], workers: int) -> list[list[Job]]:
    """Consecutive jobs of one model set cut into rows: enough rows per set to keep every worker busy, none longer
    than MAX_JOBS_PER_ROW (`jobs` come grouped by model set)."""
    rows = []
    for _, group in itertools.groupby(jobs, key=lambda job: job.models):
        group = list(group)
        size = max(1, min(MAX_JOBS_PER_ROW, math.ceil(len(group) / workers)))
        rows += [group[start:start + size] for start in range(0, len(group), size)]
    return rows


def pool_shape(cluster_resources: dict, node_resources: list[dict], options: RayOptions) -> PoolShape:
    """How many actors, with what share of a node each: one per GPU when the cluster has GPUs, else one per
    `cpus_per_worker` cores (default 4, at most a node's cores). Refuses a pool the cluster cannot place."""
    gpus_total = cluster_resources.get("GPU", 0.0)
    cpus_total = cluster_resources.get("CPU", 0.0)
    largest_node = max((node.get("CPU", 0.0) for node in node_resources), default=0.0)
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus_total >= 1 else 0.0)
    if gpus:
        if gpus > max((node.get("GPU", 0.0) for node in node_resources), default=0.0):
            raise ValueError(f"--gpus-per-worker {gpus:g} asks for more GPUs than any node of the cluster has "
                             f"({gpus_total:g} GPUs in all); lower it or add GPU nodes")
        cpus = options.cpus_per_worker or 1
        workers = options.workers or max(1, int(gpus_total // gpus))
    else:
        cpus = options.cpus_per_worker or max(1, min(DEFAULT_CPUS_PER_WORKER, int(largest_node)))
        workers = options.workers or max(1, int(cpus_total // cpus))
    if cpus > largest_node:
        raise ValueError(f"--cpus-per-worker {cpus} is more than the largest node's {largest_node:g} CPU cores; "
                         "lower it")
    if workers * cpus > cpus_total or workers * gpus > gpus_total:
        raise ValueError(f"{workers} workers of {cpus} CPU cores{f' and {gpus:g} GPUs' if gpus else ''} do not fit "
                         f"the cluster ({cpus_total:g} CPU cores, {gpus_total:g} GPUs): lower --workers or the "
                         "per-worker share")
    return PoolShape(workers, cpus, gpus)


class BatchWorker:
    """A Ray Data actor: one JobRunner whose loaded weights outlive the calls, a row of jobs per call."""

    def __init__(self, settings: RunSettings, cpus: int):
        if not torch.cuda.is_available():
            torch.set_num_threads(cpus)  # the actor's share of the node, not every core of it
        self._runner = JobRunner(settings)
        self._name = f"{socket.gethostname()}:{os.getpid()}"

    def run_job(self, job: Job) -> JobOutcome:
        return self._runner.run(job)

    def __call__(self, batch):
        import pyarrow as pa

        outcomes = [self.run_job(job) for blob in batch.column("jobs").to_pylist() for job in pickle.loads(blob)]
        return pa.table({
            "name": pa.array([outcome.job.name for outcome in outcomes], type=pa.string()),
            "error": pa.array([outcome.error for outcome in outcomes], type=pa.string()),
            "seconds": pa.array([outcome.seconds for outcome in outcomes], type=pa.float64()),
            "started_at": pa.array([outcome.started_at for outcome in outcomes], type=pa.float64()),
            "images": pa.array([_array_bytes(outcome.images) for outcome in outcomes], type=pa.binary()),
            "parameters": pa.array([json.dumps(outcome.parameters) for outcome in outcomes], type=pa.string()),
            "worker": pa.array([self._name] * len(outcomes), type=pa.string()),
        })


def _array_bytes(images: torch.Tensor | None) -> bytes:
    if images is None:
        return b""
    buffer = io.BytesIO()
    np.save(buffer, images.numpy(), allow_pickle=False)
    return buffer.getvalue()


def _images(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def run_on_ray(jobs: list[Job], settings: RunSettings, options: RayOptions,
               worker_class: type[BatchWorker] | None = None) -> Iterator[JobOutcome]:
    """The jobs' outcomes as the actors finish them (in no fixed order); `jobs` come grouped by model set.
    `worker_class`: the actor, BatchWorker unless a test injects a subclass."""
    if not jobs:
        return
    ray = import_ray()
    joined_here = not ray.is_initialized()
    if joined_here:
        ray.init(address=options.address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the batch draws one bar over all jobs
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        shape = pool_shape(ray.cluster_resources(), nodes, options)
        rows = rows_of_jobs(jobs, shape.workers)
        dataset = ray.data.from_items([{"jobs": pickle.dumps(row)} for row in rows], override_num_blocks=len(rows))
        results = dataset.map_batches(
            worker_class or BatchWorker, fn_constructor_kwargs={"settings": settings, "cpus": shape.cpus_per_worker},
            batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=min(shape.workers, len(rows))),
            num_cpus=shape.cpus_per_worker, num_gpus=shape.gpus_per_worker or None)
        by_name = {job.name: job for job in jobs}
        try:
            for row in results.iter_rows():
                images = _images(row["images"]) if row["error"] is None else None
                yield JobOutcome(by_name[row["name"]], images, row["error"], row["seconds"], row["started_at"],
                                 json.loads(row["parameters"]))
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"the Ray run stopped: {str(error).splitlines()[0]}; the images written so far are "
                               "kept and a rerun skips them") from error
    finally:
        if joined_here:
            ray.shutdown()
