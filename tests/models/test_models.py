"""SDXLModel: the bundle `load_checkpoint` returns."""

from __future__ import annotations

import pytest

from sdxl_core.config import TINY_BASE, TINY_REFINER
from tests._checkpoints import single_thread, tiny_model

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


def test_kind_modules_and_parameter_count():
    base, refiner = tiny_model(TINY_BASE), tiny_model(TINY_REFINER)
    assert base.kind == "base" and refiner.kind == "refiner"
    assert set(base.modules()) == {"unet", "vae", "clip_g", "clip_l"}
    assert set(refiner.modules()) == {"unet", "vae", "clip_g"} and refiner.clip_l is None
    assert base.parameter_count() == sum(p.numel() for m in base.modules().values() for p in m.parameters())


def test_to_moves_every_network():
    model = tiny_model(TINY_REFINER)
    assert model.to("meta") is model
    assert {p.device.type for m in model.modules().values() for p in m.parameters()} == {"meta"}
