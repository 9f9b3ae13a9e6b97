"""benchmarks/activation_memory.py: the fake-tensor memory measurement behind the project's activation estimates.

The default run keeps its code paths working on the tiny configs (a second); the full-size check, which confirms
that every estimate covers the measured peak at 1024x1024, takes about half a minute and is in the heavy tier.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "activation_memory.py"


@pytest.fixture(scope="module")
def script():
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    spec = importlib.util.spec_from_file_location("activation_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["activation_memory"] = module  # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("activation_memory", None)


def test_tiny_unet_weights_are_counted_exactly_and_activations_grow_with_the_latent(script):
    from sdxl_core.config import TINY_BASE_UNET
    from sdxl_core.models.unet import UNetModel

    small = script.measure_unet("tiny", TINY_BASE_UNET, torch.float16, 2, 8, 8)
    large = script.measure_unet("tiny", TINY_BASE_UNET, torch.float16, 2, 16, 16)
    params = UNetModel(TINY_BASE_UNET, dtype=torch.float16, device="meta").parameters()
    assert small.weights_bytes == sum(p.numel() * 2 for p in params)
    assert 0 < small.activation_peak_bytes < large.activation_peak_bytes <= 4.5 * small.activation_peak_bytes


def test_tiny_vae_decode_and_encode_are_measured(script):
    from sdxl_core.config import TINY_VAE

    decode, encode = script.measure_vae(TINY_VAE, torch.float32, 64, 64)
    assert decode.what == "VAE decode" and encode.what == "VAE encode"
    assert decode.activation_peak_bytes > 0 and encode.activation_peak_bytes > 0
    assert decode.weights_bytes == encode.weights_bytes > 0


@pytest.mark.heavy
def test_every_estimate_covers_the_measured_full_size_peak(tmp_path, script):
    out = tmp_path / "memory.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["estimates_short"] == []
    by_stage = {m["what"]: m for m in data["measurements"]}
    # One UNet's weights plus its guided step's activations fit an 8 GB card's usable 7.5 GiB with room to spare.
    assert max(data["stage_peak_bytes"].values()) < 6 * 2**30
    assert by_stage["base UNet, batch 2"]["weights_bytes"] > 4.5 * 2**30
