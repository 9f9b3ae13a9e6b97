"""What runs a batch's jobs, in the batch process itself or in a Ray actor: the checkpoints of one model set kept
loaded while consecutive jobs use them, and one job's sampling with the errors it may end in as sentences."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from ..checkpoints.errors import CheckpointError
from ..conditioning import ConditioningMismatch
from ..pipeline import generate
from ..runtime.residency import ResidencyError
from .batch_jobs import Job, ModelSet
from .runner import _setup


@dataclass(frozen=True)
class RunSettings:
    """The run-wide options (--device, --dtype, --low-vram), picklable so that Ray actors receive them."""

    device: str | None = None
    dtype: str | None = None
    low_vram: bool = False


# Errors a job can end in that say, in a sentence, what is wrong with its settings or files; anything else is a
# defect and is reported with its type so that it can be found.
_JOB_ERRORS = (CheckpointError, ConditioningMismatch, ValueError, FloatingPointError, ResidencyError)


def job_error_text(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return f"the device ran out of memory ({str(error).splitlines()[0]}); --low-vram keeps one network at a " \
               "time on the GPU"
    if isinstance(error, _JOB_ERRORS):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass
class JobOutcome:
    job: Job
    images: torch.Tensor | None  # [B, H, W, 3] in 0..1, or None when the job failed
    error: str | None
    seconds: float  # loading (when this job loaded the checkpoints) and sampling
    started_at: float  # wall-clock time.time() the job started, for the benchmark's overhead accounting
    parameters: dict | None = None  # the GenerationResult's: the settings and how the base sampled (for the PNG)


class JobRunner:
    """Runs jobs one after another, keeping the last model set's checkpoints loaded: jobs grouped by model set load
    each checkpoint once. A model set that failed to load fails its jobs with the same sentence, without retrying."""

    def __init__(self, settings: RunSettings):
        self._setup = _setup(argparse.Namespace(device=settings.device, dtype=settings.dtype,
                                                low_vram=settings.low_vram))
        self._loaded: dict[tuple, object] = {}  # (role, path, vae, loras) -> SDXLModel or the error loading it

    def _model(self, role: str, path, models: ModelSet):
        key = (role, path, models.vae, models.loras if role == "base" else ())
        if key not in self._loaded:
            try:
                self._loaded[key] = self._setup.load(path, models.vae, role, key[3], keep=True)
            except Exception as error:  # remembered, so the group's other jobs fail with it too
                self._loaded[key] = error
        found = self._loaded[key]
        if isinstance(found, Exception):
            raise found
        return found

    def _use(self, models: ModelSet) -> None:
        """Drop the checkpoints this model set does not share with the last one, so one set's weights are held."""
        wanted = {("base", models.base, models.vae, models.loras), ("refiner", models.refiner, models.vae, ())}
        for key in [key for key in self._loaded if key not in wanted]:
            del self._loaded[key]

    def run(self, job: Job) -> JobOutcome:
        started_at, started = time.time(), time.perf_counter()
        try:
            self._use(job.models)
            base = self._model("base", job.models.base, job.models)
            refiner = self._model("refiner", job.models.refiner, job.models) if job.models.refiner else None
            result = generate(base, refiner, job.request, residency=self._setup.residency,
                              embeddings=list(job.embeddings) or None)
        except Exception as error:  # one job's failure is recorded; the batch goes on with the others
            return JobOutcome(job, None, job_error_text(error), time.perf_counter() - started, started_at)
        return JobOutcome(job, result.images, None, time.perf_counter() - started, started_at, result.parameters)
