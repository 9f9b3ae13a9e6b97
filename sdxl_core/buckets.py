"""The multi-aspect training buckets of SDXL (Podell et al. 2023, arXiv 2307.01952, §2.3 and App. I).

About 1024² pixels each, sides in multiples of 64. The list is the one public code copies from the paper's
appendix table (docs/conditioning.md#aspect-buckets); sgm's 26 demo sizes are a subset of it, all but one
portrait size (704x1344) that the table lacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    """One training resolution, in pixels."""

    width: int
    height: int

    @property
    def aspect_ratio(self) -> float:
        """Width over height, the way users talk about 16:9."""
        return self.width / self.height

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height} ({_ratio_name(self.width, self.height)})"


def _ratio_name(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    w, h = width // divisor, height // divisor
    if w <= 32 and h <= 32:
        return f"{w}:{h}"
    return f"{width / height:.2f}:1"


# (height, width) pairs in the paper's order (H/W ascending): widest landscape first, tallest portrait last.
_PAPER_TABLE_HW = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)

SDXL_BUCKETS: tuple[Bucket, ...] = tuple(Bucket(width=w, height=h) for h, w in _PAPER_TABLE_HW)
DEFAULT_BUCKET = Bucket(width=1024, height=1024)


def nearest_bucket(width: float, height: float) -> Bucket:
    """The training bucket whose aspect ratio is closest (in log space, so 2:1 and 1:2 are equally far) to W×H."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(SDXL_BUCKETS, key=lambda b: abs(math.log(b.aspect_ratio) - target))


def bucket_for_ratio(ratio: str | float) -> Bucket:
    """The nearest bucket for an aspect ratio given as W/H, as "16:9", "16/9" or a number."""
    if isinstance(ratio, str):
        text = ratio.strip().replace("/", ":")
        try:
            if ":" in text:
                w, h = (float(part) for part in text.split(":"))
            else:
                w, h = float(text), 1.0
        except ValueError:
            raise ValueError(f"aspect ratio {ratio!r} is not of the form W:H (e.g. 16:9) or a number") from None
    else:
        w, h = float(ratio), 1.0
    return nearest_bucket(w, h)


def bucket_by_label(label: str) -> Bucket:
    """The bucket a UI label names ("1152x896 (9:7)"; the size alone, "1152x896", is accepted too)."""
    size = label.split(" ", 1)[0]
    for bucket in SDXL_BUCKETS:
        if f"{bucket.width}x{bucket.height}" == size:
            return bucket
    raise ValueError(f"{label!r} is not one of the {len(SDXL_BUCKETS)} SDXL training buckets "
                     f"(e.g. {SDXL_BUCKETS[20].label!r})")
