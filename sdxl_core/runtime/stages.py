"""What is in memory when: each step of the pipeline reads the networks it needs and lets them go afterwards.

A two-stage run needs one stage's networks at a time: the base's text encoders to encode the prompts, then the
base UNet, then the refiner's text encoder and UNet, then a VAE. Holding both checkpoints whole in fp32 costs the
sum of all of them (about 26 GB for SDXL base + refiner); reading each network when its step starts and releasing it
when the step ends costs the largest one plus what carries over between steps (latents and conditioning, a few MB).

`pipeline_stage` applies that to models opened with `open_checkpoint`: a network that is not in memory when a step
starts is read for it and released when the step ends. A network that is already in memory stays as the caller had
it (loaded whole with `load_checkpoint`, built in memory, patched with a LoRA or optimised in place): releasing it
would throw away work the caller asked for, or its changes, which the file cannot give back.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys
from collections.abc import Iterator
from functools import lru_cache

from .residency import STAGE_PARTS, ResidencyPlan

logger = logging.getLogger(__name__)


def stage_components(model, part: str) -> tuple[str, ...]:
    """The components of `model` that pipeline step `part` ("text", "unet", "vae") uses."""
    if part not in STAGE_PARTS:
        raise ValueError(f"unknown stage part {part!r}; expected one of {sorted(STAGE_PARTS)}")
    return tuple(name for name in STAGE_PARTS[part] if name in model.component_names)


@contextlib.contextmanager
def pipeline_stage(model, part: str, residency: ResidencyPlan | None = None) -> Iterator[None]:
    """Run one pipeline step with `part`'s networks in memory (and, under `residency`, on its device); networks
    read from the checkpoint for this step are released when it ends, also when it fails."""
    names = stage_components(model, part)
    read_here = [name for name in names if not model.is_resident(name) and model.can_release(name)]
    try:
        with residency.stage(model, part) if residency is not None else contextlib.nullcontext():
            yield
    finally:
        released = []
        for name in read_here:
            if model.is_resident(name):
                if residency is not None:
                    residency.release(model.component(name))  # the plan keeps host copies of what it manages
                model.release(name)
                released.append(name)
        if released:
            logger.info("released the %s %s", model.kind, ", ".join(released))
            return_freed_memory()


def return_freed_memory() -> None:
    """Hand the memory of released networks back to the operating system now.

    Dropping the last reference frees a network's tensors, but glibc's allocator keeps freed blocks below its
    (adaptive, up to 32 MiB) mmap threshold in its heap, so most of an SDXL UNet's weights would stay in the
    process's resident memory and the next stage would be counted on top of them. `malloc_trim(0)` returns the free
    heap pages; elsewhere (macOS, Windows, musl) the allocators return large blocks themselves.
    """
    gc.collect()  # networks in reference cycles (modules holding hooks on themselves) go now, not at some later GC
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim): nothing to trim
        return None
