"""A single-line terminal progress bar for the command line (no dependency beyond the standard library)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """One bar over the whole run: `advance()` once per unit (a UNet step of either stage; a job of a batch)."""

    def __init__(self, total: int, label: str = "sampling", stream: TextIO | None = None, width: int = 30,
                 unit: str = "it"):
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, stage: str | None = None) -> None:
        if self.done == self.total:
            return  # a grid can hold more sigmas than steps (ComfyUI's ddim_uniform); the bar already shows done
        self.done += 1
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        stage_text = f" [{stage}]" if stage else ""
        eta = f" ETA {_clock((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        self.stream.write(f"\r{self.label}{stage_text} |{'#' * filled}{'.' * (self.width - filled)}| "
                          f"{self.done}/{self.total} {rate:.2f} {self.unit}/s{eta}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
