"""Checks of the command line's values, all made before anything is loaded: each bad value is refused with a
sentence that names the option, what it expects, what it got and what to do.

argparse `type=` functions refuse a value on its own (a seed outside 0..2^64-1, a non-finite cfg); the
`check_*` functions refuse what only the parsed whole can tell (an image too large, an unwritable --out).
"""

from __future__ import annotations

import argparse
import math
import re
import secrets
from collections.abc import Callable, Sequence

from ..sampling.settings import MAX_SEED, MAX_STEPS  # the core ranges, checked here before anything loads

__all__ = ["MAX_SEED", "MAX_STEPS"]  # re-exported: the command line reads both ranges from here

# The largest side this command line accepts. SDXL is trained around one megapixel (1024x1024); far beyond 4096 it
# composes badly, and 8192 x 8192 is already 64 megapixels of activations. Whether a size fits the machine's memory
# is a separate, finer check; this bound only keeps typos like 16384 from allocating until the machine gives up.
MAX_IMAGE_SIDE = 8192
# The largest number of pixels one run samples at once (batch size x width x height): one 8192 x 8192 image.
MAX_BATCH_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
# The largest batch ComfyUI's empty-latent widget accepts.
MAX_BATCH_SIZE = 4096
# Micro-conditioning sizes are numbers the model reads, not pixels it draws; ComfyUI's widgets stop at 16384.
MAX_CONDITIONING_SIDE = 16384
RANDOM_SEED_WORDS = ("random", "-1")

_DASH_VALUE = re.compile(r"^-(?:[\d.]|inf|nan)", re.IGNORECASE)  # -5,-5  -1  -.5  -inf


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """`--crop-top-left -5,-5` as `--crop-top-left=-5,-5`: argparse takes a value that starts with "-" and is not a
    plain number for an option, and would answer "expected one argument" instead of saying what is wrong with it.
    No option of this command line starts with a single dash and a digit, "inf" or "nan", so the join is safe."""
    joined: list[str] = []
    for token in argv:
        previous = joined[-1] if joined else ""
        if (_DASH_VALUE.match(token) and previous.startswith("--") and "=" not in previous
                and previous != "--"):
            joined[-1] = f"{previous}={token}"
        else:
            joined.append(token)
    return joined


def seed(text: str) -> int | None:
    """A seed in 0..2^64-1, or None for `random` / `-1` (drawn by `resolve_seed`)."""
    if text.strip().lower() in RANDOM_SEED_WORDS:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {MAX_SEED} (2^64-1), or 'random' "
                                         f"(also spelled -1), got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds run from 0 to {MAX_SEED} (2^64-1), got {value}; use 'random' (or "
                                         "-1) for a fresh seed")
    return value


def resolve_seed(value: int | None) -> tuple[int, bool]:
    """The seed to run with and whether it was drawn; a drawn seed is recorded in the PNG like a given one."""
    if value is not None:
        return value, False
    return secrets.randbits(64), True


def finite_float(what: str, *, minimum: float | None = None, hint: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number (NaN and infinities refused), at least `minimum` when given."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} as a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what} as a finite number, got {text!r}{hint}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} of at least {minimum:g}, got {text}{hint}")
        return value

    return parse


def whole_number(what: str, *, minimum: int, maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number in minimum..maximum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} as a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {what} from {minimum} to {maximum}, got {value}")
        return value

    return parse


def image_side(text: str) -> int:
    """--width / --height: a whole number of pixels up to MAX_IMAGE_SIDE (multiples of 8 are checked with the
    request, which knows the VAE)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"image sides must be positive, got {value}")
    if value > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(
            f"{value} pixels is more than the {MAX_IMAGE_SIDE} this command accepts per side; SDXL is trained "
            "around 1024x1024 (see --bucket for its sizes): make the image smaller, or upscale it afterwards")
    return value


def aspect_ratio(text: str) -> float:
    """--bucket: an aspect ratio as W:H, W/H or a number, finite and positive; returned as width / height."""
    cleaned = text.strip().replace("/", ":")
    try:
        parts = [float(part) for part in cleaned.split(":")] if ":" in cleaned else [float(cleaned), 1.0]
        width, height = parts
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an aspect ratio as W:H (e.g. 16:9) or a number (e.g. 1.5), got "
                                         f"{text!r}") from None
    if not all(math.isfinite(part) and part > 0 for part in (width, height)):
        raise argparse.ArgumentTypeError(f"expected an aspect ratio of two positive finite numbers (e.g. 16:9), "
                                         f"got {text!r}")
    return width / height


def conditioning_size(text: str) -> tuple[int, int]:
    """--original-size / --target-size: "WxH" in pixels, each side 1..MAX_CONDITIONING_SIDE."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size as WIDTHxHEIGHT (e.g. 1024x1024), got {text!r}") from None
    if not (0 < width <= MAX_CONDITIONING_SIDE and 0 < height <= MAX_CONDITIONING_SIDE):
        raise argparse.ArgumentTypeError(f"expected each side from 1 to {MAX_CONDITIONING_SIDE} pixels (ComfyUI's "
                                         f"range), got {text!r}")
    return width, height


def crop_offset(text: str) -> tuple[int, int]:
    """--crop-top-left: "TOP,LEFT" in pixels, each 0..MAX_CONDITIONING_SIDE (SDXL was trained on crops that cut
    pixels away, never on negative offsets)."""
    try:
        top, left = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected the crop as TOP,LEFT in pixels (e.g. 0,0), got {text!r}") from None
    if top < 0 or left < 0:
        raise argparse.ArgumentTypeError(f"crop offsets count the pixels cut from the top and the left, so they "
                                         f"cannot be negative, got {text!r}; use 0,0 for a centred subject")
    if top > MAX_CONDITIONING_SIDE or left > MAX_CONDITIONING_SIDE:
        raise argparse.ArgumentTypeError(f"expected each crop offset from 0 to {MAX_CONDITIONING_SIDE} pixels, got "
                                         f"{text!r}")
    return top, left


def check_batch_pixels(width: int, height: int, batch_size: int) -> None:
    """Refuse a batch larger, in pixels, than the one image of MAX_IMAGE_SIDE squared this command accepts."""
    pixels = width * height * batch_size
    if pixels > MAX_BATCH_PIXELS:
        raise ValueError(f"--batch-size {batch_size} at {width}x{height} samples {pixels / 1e6:.0f} megapixels at "
                         f"once, more than the {MAX_BATCH_PIXELS / 1e6:.0f} this command accepts; lower the batch "
                         "size or the image size")
