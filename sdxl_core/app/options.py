"""The options of the generating commands (generate, img2img, demo, and each line of batch) and the requests built
from them: one definition, shared by the command line and the batch job reader."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..buckets import bucket_for_ratio
from ..config import PREDICTION_TYPES
from ..dtypes import DTYPES_BY_NAME
from . import arguments
from .control_args import add_control_arguments, add_mask_argument


def _directory(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder of textual-inversion embeddings, got {text!r}, which "
                                         "is not a folder")
    return path


def _fraction(text: str) -> float:
    value = arguments.finite_float("the refiner switch as a fraction of the steps")(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"the refiner switch is a fraction of the steps in (0, 1), got {text}")
    return value


def _lora(text: str) -> tuple[Path, float, float]:
    """Parse FILE[:STRENGTH[:CLIP_STRENGTH]] (strengths from the right, so a Windows drive letter stays in the
    path); one strength applies to the UNet and the text encoders alike, as A1111's <lora:name:weight>."""
    parts = text.rsplit(":", 2)
    strengths: list[float] = []
    while len(parts) > 1 and len(strengths) < 2:
        try:
            strengths.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = Path(":".join(parts))
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"expected a LoRA file as FILE[:STRENGTH[:CLIP_STRENGTH]], got {text!r}: "
                                         f"{path} is not a file")
    if not all(math.isfinite(value) for value in strengths):
        raise argparse.ArgumentTypeError(f"LoRA strengths must be finite numbers, got {text!r}")
    model_strength = strengths[0] if strengths else 1.0
    clip_strength = strengths[1] if len(strengths) > 1 else model_strength
    return path, model_strength, clip_strength


def _rescale_multiplier(text: str) -> float:
    value = arguments.finite_float("the RescaleCFG multiplier", minimum=0.0)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"the RescaleCFG multiplier is a share in [0, 1] (0.7 is usual for "
                                         f"v-prediction models), got {text}")
    return value


def prediction_override(args: argparse.Namespace) -> dict:
    """--prediction and --zsnr as the requests' `prediction` / `zsnr` overrides (None: the checkpoint's own).
    An explicit prediction type sets zsnr too, as ComfyUI's ModelSamplingDiscrete node does."""
    if args.prediction == "auto":
        return {"prediction": None, "zsnr": True if args.zsnr else None}
    return {"prediction": args.prediction, "zsnr": bool(args.zsnr)}


def _add_prompt_arguments(parser: argparse.ArgumentParser, *, prompt_default: str | None) -> None:
    if prompt_default is None:
        parser.add_argument("--prompt", required=True, help="the prompt (both text encoders)")
    else:
        parser.add_argument("--prompt", default=prompt_default, help="the prompt (both text encoders)")
    parser.add_argument("--prompt-l", help="a separate prompt for CLIP-L (default: --prompt; the refiner has no "
                                           "CLIP-L)")
    parser.add_argument("--negative", default="", help="the negative prompt")
    parser.add_argument("--embeddings", type=_directory, action="append", metavar="DIR",
                        help="folder of textual-inversion embeddings that prompts name as embedding:NAME "
                             "(searched with its subfolders; repeat for more folders)")
    parser.add_argument("--lora", type=_lora, action="append", metavar="FILE[:STRENGTH[:CLIP]]",
                        help="merge an SDXL LoRA into the base (img2img: into --model; repeat for more, applied "
                             "in order); the strength (default 1) applies to the UNet and, unless CLIP is given, "
                             "the text encoders")
    parser.add_argument("--aesthetic-score", type=arguments.finite_float("an aesthetic score", minimum=0.0),
                        default=6.0, help="refiner aesthetic score, positive side")
    parser.add_argument("--negative-aesthetic-score", type=arguments.finite_float("an aesthetic score", minimum=0.0),
                        default=2.5, help="refiner aesthetic score, negative side")


def _add_sampling_arguments(parser: argparse.ArgumentParser, *, steps_help: str) -> None:
    from ..sampling.samplers import SAMPLERS
    from ..sampling.schedules import SCHEDULERS

    parser.add_argument("--steps", type=arguments.whole_number("the step count", minimum=1,
                                                               maximum=arguments.MAX_STEPS), help=steps_help)
    parser.add_argument("--cfg", type=arguments.finite_float(
        "the guidance scale", minimum=0.0, hint="; SDXL works best around 5-8"), help="classifier-free guidance scale")
    parser.add_argument("--sampler", choices=list(SAMPLERS), help="sampler (ComfyUI names)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sigma schedule (ComfyUI names)")
    parser.add_argument("--seed", type=arguments.seed, default=0,
                        help="noise seed, 0 to 2^64-1; same seed, same image. 'random' (or -1) draws one, which is "
                             "printed and recorded in the PNG")
    parser.add_argument("--rescale-cfg", type=_rescale_multiplier, default=0.0, metavar="MULTIPLIER",
                        help="RescaleCFG (Lin et al. 2024, as ComfyUI's RescaleCFG node): blend this share, in "
                             "[0, 1], of the guided prediction rescaled to the conditional one's spread; 0.7 for "
                             "v-prediction zsnr models such as NoobAI-XL, 0 (default) is plain CFG")
    parser.add_argument("--prediction", choices=["auto", *PREDICTION_TYPES], default="auto",
                        help="what the model predicts, as ComfyUI's ModelSamplingDiscrete sets it (generate: the "
                             "base; img2img: --model): auto (default) reads the checkpoint's v_pred marker; give "
                             "eps or v_prediction for a file that lacks it")
    parser.add_argument("--zsnr", action="store_true",
                        help="sample on the zero-terminal-SNR schedule (ComfyUI's ModelSamplingDiscrete zsnr): with "
                             "--prediction auto it turns zsnr on for a file without the ztsnr marker; with "
                             "--prediction eps or v_prediction zsnr is off unless this is given, as in that node")


def _add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES_BY_NAME), help="UNet and text-encoder precision")
    parser.add_argument("--storage-dtype", choices=["auto", *DTYPES_BY_NAME], default="auto",
                        help="precision the weights are held in while the networks compute in --dtype, each layer "
                             "casting its own as it runs; auto (default) keeps a file's fp16/bf16 where the compute "
                             "is fp32 (the CPU): half the memory, the same image")
    parser.add_argument("--low-vram", action="store_true",
                        help="keep weights in system RAM and move one network at a time onto the GPU (8 GB cards)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output PNG file (a batch adds _1, _2, ... to the name for the images after the first)")


def _add_generation_arguments(parser: argparse.ArgumentParser, *, with_models: bool) -> None:
    if with_models:
        parser.add_argument("--base", required=True, type=Path, help="SDXL base checkpoint (.safetensors or folder)")
        parser.add_argument("--refiner", type=Path, help="SDXL refiner checkpoint; without it the base runs all steps")
        parser.add_argument("--vae", type=Path, help="a separate VAE file replacing the checkpoints' VAE")
    _add_prompt_arguments(parser, prompt_default=None if with_models else
                          "a lighthouse on a cliff at dusk, oil painting")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--width", type=arguments.image_side,
                      help=f"image width in pixels, a multiple of 8 (at most {arguments.MAX_IMAGE_SIDE})")
    size.add_argument("--bucket", type=arguments.aspect_ratio, metavar="RATIO",
                      help="pick the nearest SDXL training bucket for an aspect ratio, e.g. 16:9")
    parser.add_argument("--height", type=arguments.image_side,
                        help="image height in pixels, a multiple of 8 (with --width)")
    parser.add_argument("--batch-size", type=arguments.whole_number("the batch size", minimum=1,
                                                                    maximum=arguments.MAX_BATCH_SIZE),
                        default=1,
                        help="images sampled together from one seed, as ComfyUI's batch_size")
    parser.add_argument("--original-size", type=arguments.conditioning_size, metavar="WxH",
                        help="micro-conditioning: the apparent source size (default: the output size)")
    parser.add_argument("--crop-top-left", type=arguments.crop_offset, metavar="TOP,LEFT", default=(0, 0),
                        help="micro-conditioning: apparent crop offset; 0,0 keeps subjects centred")
    parser.add_argument("--target-size", type=arguments.conditioning_size, metavar="WxH",
                        help="micro-conditioning: the training bucket to aim for (default: the output size)")
    _add_sampling_arguments(parser, steps_help="total steps of the trajectory (base + refiner)")
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument("--refiner-start", type=arguments.whole_number("the refiner start step", minimum=0,
                                                                        maximum=arguments.MAX_STEPS),
                        metavar="K", help="the refiner takes over at step K")
    switch.add_argument("--refiner-switch", type=_fraction, metavar="FRACTION",
                        help="the refiner takes over after this fraction of the steps (default 0.8)")
    _add_runtime_arguments(parser)


def _add_img2img_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="SDXL refiner (to polish a finished image) or base checkpoint; which one is read from "
                             "the file")
    parser.add_argument("--vae", type=Path, help="a separate VAE file replacing the checkpoint's VAE")
    parser.add_argument("--image", required=True, type=Path, help="the picture to rework; sides multiples of 8")
    parser.add_argument("--strength", type=arguments.finite_float("the strength"), default=None,
                        help="share of the noise schedule run again, in (0, 1]: about 0.2-0.3 polishes details, "
                             "1 repaints from noise (default 0.3)")
    _add_prompt_arguments(parser, prompt_default=None)
    _add_sampling_arguments(parser, steps_help="steps actually run (default 20)")
    _add_runtime_arguments(parser)
    add_mask_argument(parser)
    add_control_arguments(parser)


def _request_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, defaults: dict):
    from ..pipeline import GenerationRequest

    if args.bucket is not None:
        if args.height is not None:
            parser.error("--bucket sets both width and height; drop --height")
        try:
            bucket = bucket_for_ratio(args.bucket)
        except ValueError as error:
            parser.error(str(error))
        width, height = bucket.width, bucket.height
    elif args.width is not None or args.height is not None:
        if args.width is None or args.height is None:
            parser.error("give both --width and --height (or --bucket RATIO)")
        width, height = args.width, args.height
    else:
        width, height = defaults["width"], defaults["height"]
    try:
        arguments.check_batch_pixels(width, height, args.batch_size)
    except ValueError as error:
        parser.error(str(error))
    steps = args.steps if args.steps is not None else defaults["steps"]
    if args.refiner_start is not None:
        refiner_start = args.refiner_start
    else:
        fraction = args.refiner_switch if args.refiner_switch is not None else 0.8
        # A fraction in (0, 1) names a step in 1..steps however few the steps (0.2 of 2 is step 1, not 0).
        refiner_start = min(max(round(steps * fraction), 1), max(steps, 1))
    original = args.original_size or (width, height)
    target = args.target_size or (width, height)
    try:
        return GenerationRequest(
            prompt=args.prompt, prompt_l=args.prompt_l, negative=args.negative, width=width, height=height,
            original_size=(original[1], original[0]), crop_top_left=args.crop_top_left,
            target_size=(target[1], target[0]), aesthetic_score=args.aesthetic_score,
            negative_aesthetic_score=args.negative_aesthetic_score, steps=steps, refiner_start=refiner_start,
            cfg=args.cfg if args.cfg is not None else defaults["cfg"],
            sampler=args.sampler or defaults["sampler"], scheduler=args.scheduler or defaults["scheduler"],
            seed=args.seed, batch_size=args.batch_size, rescale_cfg=args.rescale_cfg, **prediction_override(args),
        )
    except ValueError as error:
        parser.error(str(error))


def _img2img_request_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from ..pipeline import ImageToImageRequest

    defaults = ImageToImageRequest(prompt="")
    try:
        return ImageToImageRequest(
            prompt=args.prompt, prompt_l=args.prompt_l, negative=args.negative,
            strength=args.strength if args.strength is not None else defaults.strength,
            steps=args.steps if args.steps is not None else defaults.steps,
            aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
            cfg=args.cfg if args.cfg is not None else defaults.cfg, sampler=args.sampler or defaults.sampler,
            scheduler=args.scheduler or defaults.scheduler, seed=args.seed, rescale_cfg=args.rescale_cfg,
            **prediction_override(args))
    except ValueError as error:
        parser.error(str(error))
