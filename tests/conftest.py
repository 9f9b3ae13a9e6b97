import os

import pytest
import torch


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
