"""Terminal progress for the command line (no dependency beyond the standard library): loading as its own phase,
then one bar over the sampling steps whose speed counts sampling time only."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class ProgressBar:
    """One bar over the whole run: `advance()` once per unit (a UNet step of either stage; a job of a batch).

    The speed is measured from `start_sampling()` (the end of the last `loading` phase when it was not called), so
    loading a checkpoint for a minute does not make the first steps look slow.
    """

    def __init__(self, total: int, label: str = "sampling", stream: TextIO | None = None, width: int = 30,
                 clock=time.perf_counter, unit: str = "it"):
        self.total = max(total, 1)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self._clock = clock
        self.started = clock()

    @contextlib.contextmanager
    def loading(self, what: str) -> Iterator[None]:
        """Show `loading <what> ...` and, once done, how long it took; the sampling clock restarts afterwards."""
        began = self._clock()
        self.stream.write(f"loading {what} ...")
        self.stream.flush()
        try:
            yield
        except BaseException:
            self.stream.write("\n")  # the error message that follows gets a line of its own
            raise
        self.stream.write(f" {self._clock() - began:.1f} s\n")
        self.stream.flush()
        self.start_sampling()

    def start_sampling(self) -> None:
        """Count the speed from now (call it when the work the bar measures begins)."""
        self.started = self._clock()

    def rate_text(self) -> str:
        """Units per second, or seconds per unit when one takes longer than a second (a CPU at full size), and the
        time left at that speed."""
        elapsed = self._clock() - self.started
        if self.done == 0 or elapsed <= 0:
            return f"-- {self.unit}/s"
        rate = self.done / elapsed
        speed = f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}"
        eta = f" ETA {_hms((self.total - self.done) / rate)}" if self.done < self.total else ""
        return speed + eta

    def advance(self, stage: str | None = None) -> None:
        if self.done == self.total:
            return  # a grid can hold more sigmas than steps (ComfyUI's ddim_uniform); the bar already shows done
        self.done += 1
        filled = self.width * self.done // self.total
        stage_text = f" [{stage}]" if stage else ""
        self.stream.write(f"\r{self.label}{stage_text} |{'#' * filled}{'.' * (self.width - filled)}| "
                          f"{self.done}/{self.total} {self.rate_text()}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
