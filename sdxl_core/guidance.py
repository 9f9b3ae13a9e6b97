"""Classifier-free guidance as a denoiser wrapper: one batched model call for both branches.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance", applied to x0 as ComfyUI does (`samplers.cfg_function`;
sgm `VanillaCFG`): x0 = uncond + (cond - uncond) * cfg, which equals guidance on eps because x0 is affine in eps
at a fixed sigma. Conditioning per branch is a dict of tensors (`context`, `y`) that is concatenated key by key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .denoiser import per_item_sigma

Denoiser = Callable[..., torch.Tensor]
Conditioning = Mapping[str, torch.Tensor]

# Keys holding cross-attention tokens [B, T, C]; branches with different T are padded by repetition.
CROSS_ATTENTION_KEYS = frozenset({"context"})
# ComfyUI batches two token lengths only when the repetition factor to their LCM is at most this
# (`conds.CONDCrossAttn.can_concat`); beyond it the branches run as separate calls.
MAX_TOKEN_REPEAT = 4


class CFGDenoiser:
    """Guided denoiser `(x, sigma) -> x0` over an inner `denoiser(x, sigma, **cond) -> x0` (ComfyUI
    `sampling_function`): one call on [uncond; cond], or the cond branch alone when cfg == 1."""

    def __init__(self, denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, cfg: float):
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = None if uncond is None else dict(uncond)
        self.cfg = float(cfg)
        # ComfyUI skips the unconditional pass when cfg is 1 (its "cfg1 optimization"): the result is the same.
        self.skips_uncond = math.isclose(self.cfg, 1.0)
        if self.uncond is None and not self.skips_uncond:
            raise ValueError(f"cfg={self.cfg} needs an unconditional (negative) conditioning; only cfg=1 runs without")
        if self.uncond is not None and set(self.uncond) != set(self.cond):
            raise ValueError(f"cond and uncond must carry the same keys, got {sorted(self.cond)} and "
                             f"{sorted(self.uncond)}")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = per_item_sigma(sigma, x)
        if self.skips_uncond:
            cond_x0 = self.denoiser(x, sigma, **expand_to_batch(self.cond, x.shape[0]))
            return cond_x0 * self.cfg
        uncond_x0, cond_x0 = self._both_branches(x, sigma)
        return uncond_x0 + (cond_x0 - uncond_x0) * self.cfg

    def _both_branches(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        uncond = expand_to_batch(self.uncond, batch)
        cond = expand_to_batch(self.cond, batch)
        if not can_batch(uncond, cond):
            return self.denoiser(x, sigma, **uncond), self.denoiser(x, sigma, **cond)
        # Unconditional first, as ComfyUI orders the batch.
        x0 = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **concat_conditioning(uncond, cond))
        return x0[:batch], x0[batch:]


def expand_to_batch(cond: Conditioning, batch: int) -> dict[str, torch.Tensor]:
    """Repeat batch-1 conditioning to the latent batch (ComfyUI `repeat_to_batch_size` for the common cases)."""
    out = {}
    for key, value in cond.items():
        if value.shape[0] == batch:
            out[key] = value
        elif value.shape[0] == 1:
            # A real copy, not an expand() view, so that the model may reshape it freely.
            out[key] = value.repeat(batch, *([1] * (value.ndim - 1)))
        else:
            raise ValueError(f"conditioning {key!r} has batch {value.shape[0]}; expected 1 or the latent batch {batch}")
    return out


def can_batch(a: Conditioning, b: Conditioning) -> bool:
    """Whether two branches fit one call (ComfyUI `CONDRegular`/`CONDCrossAttn.can_concat`)."""
    for key in a:
        sa, sb = a[key].shape, b[key].shape
        if key in CROSS_ATTENTION_KEYS and sa != sb:
            if len(sa) != 3 or len(sb) != 3 or sa[0] != sb[0] or sa[2] != sb[2]:
                raise ValueError(f"{key!r} shapes {tuple(sa)} and {tuple(sb)} differ beyond the token count")
            if math.lcm(sa[1], sb[1]) // min(sa[1], sb[1]) > MAX_TOKEN_REPEAT:
                return False
        elif sa != sb:
            raise ValueError(f"conditioning {key!r} differs in shape between branches: {tuple(sa)} and {tuple(sb)}")
    return True


def concat_conditioning(*branches: Conditioning) -> dict[str, torch.Tensor]:
    """Batch-concatenate branches key by key; token sequences of different lengths are first repeated to their
    least common multiple, which leaves attention unchanged (ComfyUI `conds.CONDCrossAttn.concat`)."""
    out = {}
    for key in branches[0]:
        values = [branch[key] for branch in branches]
        if key in CROSS_ATTENTION_KEYS:
            length = math.lcm(*(v.shape[1] for v in values))
            values = [v.repeat(1, length // v.shape[1], 1) if v.shape[1] < length else v for v in values]
        out[key] = torch.cat(values)
    return out
