"""What the `generate` and `demo` commands do once their arguments are parsed: load, generate, save."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import default_dtype, default_vae_dtype, load_checkpoint
from .checkpoint_errors import CheckpointError
from .conditioning import ConditioningMismatch
from .pipeline import GenerationRequest, generate
from .progress import ProgressBar
from .residency import ResidencyError, ResidencyPlan
from .samplers import SamplingCancelled

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device name (e.g. cpu, cuda, cuda:1): {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but this torch build sees no CUDA GPU")
    return device


def _png_text(request: GenerationRequest, sources: dict[str, str]) -> dict[str, str]:
    """PNG text chunks: a one-line summary in the common `parameters` style and the full settings as JSON."""
    summary = (f"{request.prompt}\nNegative prompt: {request.negative}\nSteps: {request.steps}, "
               f"Sampler: {request.sampler}, Scheduler: {request.scheduler}, CFG scale: {request.cfg}, "
               f"Seed: {request.seed}, Size: {request.width}x{request.height}, Refiner start: {request.refiner_start}")
    return {"parameters": summary, "sdxl_core": json.dumps({**request.parameters(), **sources}, sort_keys=True)}


def save_png(images: torch.Tensor, path: Path, text: dict[str, str]) -> list[Path]:
    """Write IMAGE [B, H, W, 3] as PNGs with text chunks; uint8 by truncation as ComfyUI's SaveImage does. Each file
    is written under a temporary name and renamed, so an interrupted run leaves no half-written PNG."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    written = []
    for index, image in enumerate(images):
        target = path if index == 0 else path.with_name(f"{path.stem}_{index}{path.suffix}")
        pixels = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
        partial = target.with_name(target.name + ".partial")
        Image.fromarray(pixels).save(partial, format="PNG", pnginfo=info)
        os.replace(partial, target)
        written.append(target)
    return written


def _run(request: GenerationRequest, base_path: Path, refiner_path: Path | None, vae_path: Path | None,
         args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".png":
        print(f"error: --out must name a .png file, got {args.out}", file=sys.stderr)
        return 2
    if not args.out.parent.exists():
        print(f"error: the folder {args.out.parent} does not exist", file=sys.stderr)
        return 2
    try:
        device = _device(args.device)
        dtype = _DTYPES[args.dtype] if args.dtype else None
        residency = None
        if getattr(args, "low_vram", False):
            if device.type != "cuda":
                raise ValueError("--low-vram manages GPU memory; it needs a CUDA device")
            residency = ResidencyPlan.for_card(device)
        # Under a residency plan the weights wait in system RAM and the plan moves each network in when it runs.
        load_device = torch.device("cpu") if residency is not None else device
        dtype = dtype or default_dtype(device)
        base = load_checkpoint(base_path, dtype=dtype, device=load_device, vae_path=vae_path,
                               vae_dtype=default_vae_dtype(device), expect="base")
        refiner = None
        if refiner_path is not None:
            refiner = load_checkpoint(refiner_path, dtype=dtype, device=load_device, vae_path=vae_path,
                                      vae_dtype=default_vae_dtype(device), expect="refiner")
        bar = ProgressBar(total=request.steps)
        result = generate(base, refiner, request, on_step=bar.advance, residency=residency,
                          embeddings=args.embeddings)
    except (CheckpointError, ConditioningMismatch, ValueError, FloatingPointError, ResidencyError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as error:
        hint = "" if getattr(args, "low_vram", False) else "; --low-vram keeps one network at a time on the GPU"
        print(f"\nerror: the device ran out of memory ({str(error).splitlines()[0]}){hint}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SamplingCancelled):
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    sources = {"base": str(base_path), "refiner": str(refiner_path) if refiner_path else None,
               "vae": str(vae_path) if vae_path else None,
               "embeddings": [str(d) for d in args.embeddings] if args.embeddings else None}
    for path in save_png(result.images, args.out, _png_text(request, sources)):
        print(f"wrote {path}")
    return 0


def run_generate(request: GenerationRequest, args: argparse.Namespace) -> int:
    return _run(request, args.base, args.refiner, args.vae, args)


def run_demo(request: GenerationRequest, args: argparse.Namespace) -> int:
    from .demo import demo_checkpoints

    paths = demo_checkpoints()
    print(f"demo: tiny random-weight SDXL base and refiner from {paths['base'].parent}", file=sys.stderr)
    return _run(request, paths["base"], paths["refiner"], None, args)
