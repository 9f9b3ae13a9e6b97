"""Every sampler through the KSampler emulation on the tiny base: UNet passes per step (the cfg-1 skip), and that
each name runs end to end with the grid ComfyUI's KSampler gives it."""

import pytest
import torch

from sdxl_core.conditioning import BaseMicroConditioning
from sdxl_core.pipeline import empty_latent, encode_base_conditioning
from sdxl_core.sampling.ksampler import sample_latent
from sdxl_core.sampling.samplers import SAMPLERS
from sdxl_core.sampling.settings import SamplingSettings

SIZE = 64  # an 8x8 latent: every UNet pass takes milliseconds


@pytest.fixture(scope="module")
def conds(tiny_base):
    micro = BaseMicroConditioning((SIZE, SIZE))
    return (encode_base_conditioning(tiny_base, "a red cube", micro=micro),
            encode_base_conditioning(tiny_base, "blurry", micro=micro))


class UNetRows:
    """Counts UNet passes and the batch rows of each, by wrapping the module's forward."""

    def __init__(self, unet, monkeypatch):
        self.rows = []
        forward = unet.forward

        def counting(x, *args, **kwargs):
            self.rows.append(x.shape[0])
            return forward(x, *args, **kwargs)
        monkeypatch.setattr(unet, "forward", counting)


def _run(model, conds, **settings):
    return sample_latent(model, empty_latent(SIZE, SIZE), *conds, SamplingSettings(seed=3, **settings))


@pytest.mark.parametrize("cfg, rows_per_pass", [(1.0, 1), (4.0, 2)])
def test_cfg_one_costs_one_unet_row_per_step(tiny_base, conds, monkeypatch, cfg, rows_per_pass):
    """ComfyUI skips the unconditional branch at cfg 1: one latent row per UNet pass instead of the [uncond; cond]
    pair, one pass per Euler step either way."""
    unet = UNetRows(tiny_base.unet, monkeypatch)
    _run(tiny_base, conds, steps=5, cfg=cfg, sampler="euler", scheduler="normal")
    assert unet.rows == [rows_per_pass] * 5


def test_cfg_pp_runs_the_unconditional_branch_at_cfg_one(tiny_base, conds, monkeypatch):
    """A CFG++ sampler steps with the unconditional prediction, so cfg 1 cannot skip it (ComfyUI's
    disable_cfg1_optimization): two rows per pass, and a different result from euler's at cfg 1."""
    unet = UNetRows(tiny_base.unet, monkeypatch)
    cfg_pp = _run(tiny_base, conds, steps=5, cfg=1.0, sampler="euler_cfg_pp", scheduler="normal")
    assert unet.rows == [2] * 5
    euler = _run(tiny_base, conds, steps=5, cfg=1.0, sampler="euler", scheduler="normal")
    assert (cfg_pp["samples"] - euler["samples"]).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_through_the_ksampler(tiny_base, conds, sampler):
    out = _run(tiny_base, conds, steps=3, cfg=3.0, sampler=sampler, scheduler="karras")["samples"]
    assert out.shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()
    if SAMPLERS[sampler].stochastic:  # the KSampler seed drives the sampler's noise too
        again = _run(tiny_base, conds, steps=3, cfg=3.0, sampler=sampler, scheduler="karras")["samples"]
        assert torch.equal(out, again)
