"""What the `generate`, `img2img` and `demo` commands do once their arguments are parsed: load, sample, save."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoints.errors import CheckpointError
from ..checkpoints.loading import check_checkpoint, default_dtype, default_vae_dtype, load_checkpoint, open_checkpoint
from ..checkpoints.lora import apply_lora, check_lora_file
from ..conditioning import ConditioningMismatch
from ..dtypes import DTYPES_BY_NAME
from ..pipeline import GenerationRequest, GenerationResult, ImageToImageRequest, generate, image_to_image
from ..runtime.atomic_write import atomic_write, check_writable, describe_os_error
from ..runtime.residency import ResidencyError, ResidencyPlan
from ..sampling.samplers import SamplingCancelled
from .control_args import load_controls, read_mask
from .progress import ProgressBar


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


def _png_text(parameters: dict, details: str, sources: dict) -> dict[str, str]:
    """PNG text chunks: a summary in the common `parameters` style (prompt, negative, settings, how the model
    sampled, then `details`) and the full settings as JSON. `parameters`: a GenerationResult's (the request's
    settings with the prediction type and zsnr the model was sampled with)."""
    p = parameters
    summary = (f"{p['prompt']}\nNegative prompt: {p['negative']}\nSteps: {p['steps']}, "
               f"Sampler: {p['sampler']}, Scheduler: {p['scheduler']}, CFG scale: {p['cfg']}, "
               f"Seed: {p['seed']}, Prediction: {p['prediction']}, ZSNR: {p['zsnr']}, "
               f"RescaleCFG: {p['rescale_cfg']}, {details}")
    return {"parameters": summary, "sdxl_core": json.dumps({**parameters, **sources}, sort_keys=True)}


class OutputError(ValueError):
    """An output file could not be written (a full disk, a folder that turned read-only); nothing was left."""


def save_png(images: torch.Tensor, path: Path, text: dict[str, str]) -> list[Path]:
    """Write IMAGE [B, H, W, 3] as PNGs with text chunks; uint8 by truncation as ComfyUI's SaveImage does.

    All or nothing: every image is written to a temporary file first and the files get their names only once all
    of them are complete, so an interruption or a full disk leaves neither a half-written PNG nor half a batch.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    targets = [path if index == 0 else path.with_name(f"{path.stem}_{index}{path.suffix}")
               for index in range(len(images))]
    try:
        with contextlib.ExitStack() as files:
            for image, target in zip(images, targets):
                pixels = np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(files.enter_context(atomic_write(target)), format="PNG", pnginfo=info)
    except OSError as error:
        raise OutputError(f"could not write {path} ({describe_os_error(error)}); nothing was written. Free some "
                          "space or choose another --out") from None
    return targets


def check_output(path: Path) -> None:
    """Refuse, before any work, an --out that is not a .png file the run could create."""
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {path}")
    try:
        check_writable(path)
    except ValueError as error:
        raise ValueError(f"--out {path}: {error}") from None


@dataclass(frozen=True)
class _Setup:
    """Where and in what precision a command runs, from --device, --dtype and --low-vram."""

    device: torch.device
    dtype: torch.dtype
    residency: ResidencyPlan | None
    storage_dtype: torch.dtype | None = None  # None: the file's precision where it converts exactly (--storage-dtype)

    @property
    def load_device(self) -> torch.device:
        # Under a residency plan the weights wait in system RAM and the plan moves each network in when it runs.
        return torch.device("cpu") if self.residency is not None else self.device

    def load(self, path: Path, vae_path: Path | None, expect: str | None, loras=(), *, keep: bool = False):
        """A checkpoint, opened so that each network is read when its step starts and released when it ends
        (sdxl_core/runtime/stages.py), with the LoRAs of --lora merged in order (each merge drops the previous
        copy's patched weights, so the peak is the model plus one LoRA's worth of weights; patched networks stay
        in memory, as the file cannot give them back). `keep` reads every network now and keeps it, for a batch
        that reuses the weights over many jobs."""
        read = load_checkpoint if keep else open_checkpoint
        model = read(path, dtype=self.dtype, device=self.load_device, vae_path=vae_path,
                     vae_dtype=default_vae_dtype(self.device), expect=expect, storage_dtype=self.storage_dtype)
        for lora_path, strength_model, strength_clip in loras:
            model = apply_lora(model, lora_path, strength_model, strength_clip)
        return model


def _lora_sources(args: argparse.Namespace) -> list[list] | None:
    return [[str(path), model, clip] for path, model, clip in args.lora] if args.lora else None


def _setup(args: argparse.Namespace) -> _Setup:
    device = _device(args.device)
    residency = None
    if getattr(args, "low_vram", False):
        if device.type != "cuda":
            raise ValueError("--low-vram manages GPU memory; it needs a CUDA device")
        residency = ResidencyPlan.for_card(device)
    dtype = DTYPES_BY_NAME[args.dtype] if args.dtype else default_dtype(device)
    storage = getattr(args, "storage_dtype", "auto")
    return _Setup(device, dtype, residency, None if storage == "auto" else DTYPES_BY_NAME[storage])


def _report(error: BaseException, args: argparse.Namespace) -> int:
    """Print a refusal as the one-line `error: ...` sentence every command uses; the exit status to return."""
    if isinstance(error, (KeyboardInterrupt, SamplingCancelled)):
        print("\ncancelled; nothing was written", file=sys.stderr)
        return 130
    if isinstance(error, torch.OutOfMemoryError):
        hint = "" if getattr(args, "low_vram", False) else "; --low-vram keeps one network at a time on the GPU"
        print(f"\nerror: the device ran out of memory ({str(error).splitlines()[0]}){hint}", file=sys.stderr)
        return 2
    if isinstance(error, OSError):
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        print(f"\nerror: could not read or write{where}: {describe_os_error(error)}", file=sys.stderr)
        return 2
    print(f"\nerror: {error}", file=sys.stderr)
    return 2


# What a user can cause, each reported as a sentence; anything else is an internal error (sdxl_core/app/cli.py).
USER_ERRORS = (CheckpointError, ConditioningMismatch, ValueError, FloatingPointError, ResidencyError,
               torch.OutOfMemoryError, OSError, KeyboardInterrupt, SamplingCancelled)


def _run(args: argparse.Namespace, total_steps: int,
         produce: Callable[[_Setup, ProgressBar], tuple[GenerationResult, dict[str, str]]]) -> int:
    """Check --out, run `produce` (check the files, load, sample, decode) with the errors every command reports as
    sentences, and write the PNGs only once everything succeeded."""
    try:
        check_output(args.out)
        result, text = produce(_setup(args), ProgressBar(total=total_steps))
        written = save_png(result.images, args.out, text)
    except USER_ERRORS as error:
        return _report(error, args)
    for path in written:
        print(f"wrote {path}")
    return 0


def _check_lora_files(args: argparse.Namespace) -> None:
    for path, _, _ in args.lora or ():
        check_lora_file(path)


def _control_sources(args: argparse.Namespace) -> dict:
    """The --mask and --controlnet settings for the PNG's parameters (present only when given)."""
    sources = {}
    if getattr(args, "mask", None) is not None:
        sources["mask"] = str(args.mask)
    if getattr(args, "controls", None):
        sources["controlnets"] = [option.record() for option in args.controls]
    return sources


def _embedding_sources(args: argparse.Namespace) -> list[str] | None:
    return [str(d) for d in args.embeddings] if args.embeddings else None


def _run_text_to_image(request: GenerationRequest, base_path: Path, refiner_path: Path | None,
                       vae_path: Path | None, args: argparse.Namespace) -> int:
    def produce(setup: _Setup, bar: ProgressBar):
        # Every header first: a bad refiner or LoRA is refused before the base spends a minute loading.
        check_checkpoint(base_path, expect="base", vae_path=vae_path)
        if refiner_path is not None:
            check_checkpoint(refiner_path, expect="refiner", vae_path=vae_path)
        _check_lora_files(args)
        controls = load_controls(getattr(args, "controls", []), setup.dtype, setup.load_device)
        with bar.loading(f"base {base_path.name}"):
            base = setup.load(base_path, vae_path, "base", args.lora or ())
        refiner = None
        if refiner_path is not None:
            with bar.loading(f"refiner {refiner_path.name}"):
                refiner = setup.load(refiner_path, vae_path, "refiner")
        result = generate(base, refiner, request, on_step=bar.advance, residency=setup.residency,
                          embeddings=args.embeddings, controls=controls)
        sources = {"base": str(base_path), "refiner": str(refiner_path) if refiner_path else None,
                   "vae": str(vae_path) if vae_path else None, "embeddings": _embedding_sources(args),
                   "loras": _lora_sources(args), **_control_sources(args)}
        details = f"Size: {request.width}x{request.height}, Refiner start: {request.refiner_start}"
        return result, _png_text(result.parameters, details, sources)

    return _run(args, request.steps, produce)


def read_image(path: Path) -> torch.Tensor:
    """A picture file as IMAGE [1, H, W, 3] float32 in 0..1 (alpha and palettes dropped to RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError(f"--image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--image {path} is not a picture PIL can read ({error})") from None
    height, width = pixels.shape[:2]
    if height % 8 or width % 8:
        raise ValueError(f"--image {path} is {width}x{height} pixels; SDXL's VAE needs sides that are multiples of "
                         f"8: crop or resize it to {width - width % 8 or 8}x{height - height % 8 or 8}, say")
    return torch.from_numpy(pixels)[None]


def run_img2img(request: ImageToImageRequest, args: argparse.Namespace) -> int:
    def produce(setup: _Setup, bar: ProgressBar):
        images = read_image(args.image)
        check_checkpoint(args.model, vae_path=args.vae)
        _check_lora_files(args)
        mask = read_mask(args.mask) if args.mask is not None else None
        controls = load_controls(args.controls, setup.dtype, setup.load_device)
        with bar.loading(args.model.name):
            model = setup.load(args.model, args.vae, None, args.lora or ())
        result = image_to_image(model, images, request, on_step=bar.advance, residency=setup.residency,
                                embeddings=args.embeddings, mask=mask, controls=controls)
        sources = {"model": str(args.model), "model_kind": model.kind, "image": str(args.image),
                   "vae": str(args.vae) if args.vae else None, "embeddings": _embedding_sources(args),
                   "loras": _lora_sources(args), **_control_sources(args)}
        details = f"Denoising strength: {request.strength}, Model: SDXL {model.kind}"
        if mask is not None:
            details += f", Mask: {args.mask.name}"
        return result, _png_text(result.parameters, details, sources)

    return _run(args, request.steps, produce)


def run_generate(request: GenerationRequest, args: argparse.Namespace) -> int:
    return _run_text_to_image(request, args.base, args.refiner, args.vae, args)


def run_demo(request: GenerationRequest, args: argparse.Namespace) -> int:
    from .demo import demo_checkpoints

    try:
        check_output(args.out)  # before the first run writes the demo's cache
        paths = demo_checkpoints()
    except USER_ERRORS as error:
        return _report(error, args)
    print(f"demo: tiny random-weight SDXL base and refiner from {paths['base'].parent}", file=sys.stderr)
    return _run_text_to_image(request, paths["base"], paths["refiner"], None, args)
