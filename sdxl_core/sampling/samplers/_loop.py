"""The step loop every sampler runs: cancellation between steps and one progress report per step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Callback = Callable[[dict], None]
Cancel = Callable[[], bool]


class SamplingCancelled(Exception):
    """Raised between steps when the caller's `cancel()` returned true."""

    def __init__(self, step: int, total: int):
        # A sampler that chooses its own steps (dpm_adaptive) knows no total in advance.
        of = f" of {total}" if total > step else ""
        super().__init__(f"sampling cancelled before step {step + 1}{of}")
        self.step = step
        self.total = total


@dataclass
class StepLoop:
    """`for i in loop.steps(sigmas)` yields the step indices 0..len(sigmas)-2, raising SamplingCancelled when
    `cancel()` turns true before a step; `loop.report(...)` hands `callback` one dict per step:
    `{"i", "total", "x", "sigma", "sigma_hat", "denoised"}` (k-diffusion's callback keys plus the step count)."""

    callback: Callback | None = None
    cancel: Cancel | None = None
    total: int = 0

    def steps(self, sigmas: torch.Tensor) -> Iterator[int]:
        if sigmas.ndim != 1:
            raise ValueError(f"expected a 1-D sigma grid, got shape {tuple(sigmas.shape)}")
        return self.count(len(sigmas) - 1)

    def count(self, total: int) -> Iterator[int]:
        """Step indices 0..total-1, for samplers whose steps are not the grid's (dpm_fast)."""
        self.total = max(total, 0)
        for i in range(self.total):
            self.check(i)
            yield i

    def check(self, i: int) -> None:
        """Raise SamplingCancelled before step i if asked to; for loops of unknown length (dpm_adaptive), which
        set `total` as they go."""
        if self.cancel is not None and self.cancel():
            raise SamplingCancelled(i, self.total)

    def report(self, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor,
               sigma_hat: torch.Tensor | None = None) -> None:
        if self.callback is not None:
            self.callback({"i": i, "total": self.total, "x": x, "sigma": sigma,
                           "sigma_hat": sigma if sigma_hat is None else sigma_hat, "denoised": denoised})
