"""Shared fixtures for the VAE tests: non-trivial random weights (the diffusers reference is
tests._diffusers_twins.diffusers_vae)."""

from __future__ import annotations

import math

import pytest
import torch

from sdxl_core.config import VAEConfig
from sdxl_core.models.vae import AutoencoderKL


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter with seeded random values that keep activations O(1) and are far from the defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:  # conv weights: variance-preserving scale so 30+ layers neither explode nor vanish
                fan_in = param[0].numel()
                value = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.3 * torch.randn(param.shape, generator=gen)
            else:  # biases (GroupNorm and conv)
                value = 0.2 * torch.randn(param.shape, generator=gen)
            param.copy_(value.to(param.dtype))
    return module


def random_vae(config: VAEConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    return randomize_(AutoencoderKL(config), seed).to(dtype).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module", autouse=False)
def one_torch_thread():
    """Run a module on one intra-op thread: these small convolutions gain nothing from more, and on a shared,
    oversubscribed CPU the OpenMP workers spin-wait (the VAE files took 5x longer with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
