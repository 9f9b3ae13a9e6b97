"""The command line's ControlNet and inpainting-mask options: `--controlnet FILE --control-image IMAGE
[--control-strength S] [--control-start A --control-end B]` (repeatable, paired in order) and img2img's
`--mask MASK.png`; parsed and paired here, loaded and read when the command runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class ControlNetOption:
    """One --controlnet with its image and settings, as given (nothing read yet)."""

    file: Path
    image: Path
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def record(self) -> list:
        """For the PNG's parameters."""
        return [str(self.file), str(self.image), self.strength, self.start_percent, self.end_percent]


def _percent(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a ControlNet start/end is a fraction of the schedule in [0, 1], got {text}")
    return value


def _strength(text: str) -> float:
    value = float(text)
    if not (np.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"a ControlNet strength is a finite number >= 0, got {text}")
    return value


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet (SDXL base only; repeat the options for more ControlNets)")
    group.add_argument("--controlnet", type=Path, action="append", metavar="FILE",
                       help="an SDXL ControlNet (.safetensors, diffusers or original layout, or a diffusers folder)")
    group.add_argument("--control-image", type=Path, action="append", metavar="IMAGE",
                       help="the control picture (edges, depth, ...) for the --controlnet in the same position; "
                            "centre-cropped and resized to the output as ComfyUI does")
    group.add_argument("--control-strength", type=_strength, action="append", metavar="S",
                       help="how strongly it steers (default 1.0)")
    group.add_argument("--control-start", type=_percent, action="append", metavar="A",
                       help="fraction of the schedule where it starts (default 0.0)")
    group.add_argument("--control-end", type=_percent, action="append", metavar="B",
                       help="fraction of the schedule where it stops (default 1.0)")


def add_mask_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", type=Path, metavar="MASK.png",
                        help="inpaint: white repaints, black keeps (the red channel is read, as ComfyUI's "
                             "LoadImageMask with channel red); the image's size; use --strength 1.0 to repaint fully")


def control_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[ControlNetOption]:
    """Pair the repeated options in order; a count that does not match is a parser error."""
    files = args.controlnet or []
    images = args.control_image or []
    if len(images) != len(files):
        parser.error(f"{len(files)} --controlnet but {len(images)} --control-image: give one image per ControlNet")
    settings = {}
    for name, default in (("control_strength", 1.0), ("control_start", 0.0), ("control_end", 1.0)):
        values = getattr(args, name) or []
        if values and len(values) != len(files):
            parser.error(f"{len(values)} --{name.replace('_', '-')} for {len(files)} --controlnet: give none or one "
                         "per ControlNet")
        settings[name] = values or [default] * len(files)
    options = []
    for index, (file, image) in enumerate(zip(files, images)):
        start, end = settings["control_start"][index], settings["control_end"][index]
        if start > end:
            parser.error(f"ControlNet {index + 1}: --control-start {start} comes after --control-end {end}")
        options.append(ControlNetOption(file, image, settings["control_strength"][index], start, end))
    return options


def _open_picture(path: Path, what: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return ImageOps.exif_transpose(picture).copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} {path} is not a picture PIL can read ({error})") from None


def read_control_image(path: Path) -> torch.Tensor:
    """A control picture as IMAGE [1, H, W, 3] in 0..1, any size."""
    pixels = np.asarray(_open_picture(path, "--control-image").convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def read_mask(path: Path) -> torch.Tensor:
    """An inpainting mask picture as MASK [1, H, W]: its red channel in 0..1 (ComfyUI LoadImageMask, channel red;
    16-bit grey pictures are scaled to 8 bits first, as there)."""
    picture = _open_picture(path, "--mask")
    if picture.mode == "I":
        picture = picture.point(lambda value: value * (1 / 255))
    red = np.asarray(picture.convert("RGBA").getchannel("R"), dtype=np.float32) / 255.0
    return torch.from_numpy(red)[None]


def load_controls(options: list[ControlNetOption], dtype: torch.dtype, device: torch.device) -> list:
    """The ControlNetUse list for the pipeline: each file loaded (once, if repeated) and each image read."""
    from ..checkpoints.controlnet import load_controlnet
    from ..sampling.control import ControlNetUse

    networks = {}
    uses = []
    for option in options:
        image = read_control_image(option.image)  # a bad picture is refused before any weight is read
        key = option.file.expanduser().resolve()
        if key not in networks:
            networks[key] = load_controlnet(option.file, dtype=dtype, device=device)
        uses.append(ControlNetUse(networks[key], image, option.strength, option.start_percent, option.end_percent))
    return uses
