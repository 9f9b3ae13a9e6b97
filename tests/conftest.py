import os

import pytest
import torch


def pytest_configure(config):
    # The tiny models are dominated by per-op overhead, where extra intra-op threads only add synchronisation; on a
    # busy 2-core machine they made a tiny UNet call 60x slower (3.7 s vs 0.06 s). SDXL_TEST_THREADS overrides this,
    # e.g. for the heavy full-size checks.
    torch.set_num_threads(int(os.environ.get("SDXL_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SDXL_HEAVY_TESTS") == "1":
        return
    skip_heavy = pytest.mark.skip(reason="heavy: set SDXL_HEAVY_TESTS=1 to run full-size checks")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip_heavy)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_base():
    """A tiny SDXL base with deterministic random weights, built in memory (no file)."""
    from sdxl_core.app.demo import build_random_model
    from sdxl_core.config import TINY_BASE

    return build_random_model(TINY_BASE, seed=1)


@pytest.fixture(scope="session")
def tiny_refiner():
    """A tiny SDXL refiner with deterministic random weights, built in memory (no file)."""
    from sdxl_core.app.demo import build_random_model
    from sdxl_core.config import TINY_REFINER

    return build_random_model(TINY_REFINER, seed=2)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The demo's tiny base and refiner written as original-layout single files (fp16)."""
    from sdxl_core.app.demo import demo_checkpoints

    return demo_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"))
