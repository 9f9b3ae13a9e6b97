"""Full-size streaming loads: synthesize random checkpoints with the published key set (fp16, about 7 GB each),
load them strictly in a fresh process and check that peak host memory stays close to the weights' size."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests._checkpoints import write_from_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"

# Runs in a fresh interpreter so the peak resident set (ru_maxrss) belongs to this load alone. The baseline is the
# peak before loading (torch, transformers, the meta-device model build in inspect), which is not weight memory.
_LOADER = """
import json, resource, sys, time, torch
from sdxl_core.checkpoints.loading import inspect_checkpoint, load_checkpoint
from sdxl_core.config import SDXL_BASE, SDXL_REFINER
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
inspect_checkpoint(path)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = load_checkpoint(path, dtype=dtype, vae_dtype=dtype)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for m in model.modules().values() for p in m.parameters())
print(json.dumps({"baseline": baseline, "peak": peak, "weights": weights, "seconds": seconds,
                  "config_ok": model.config == (SDXL_BASE if model.kind == "base" else SDXL_REFINER),
                  "dtypes": sorted({str(p.dtype) for m in model.modules().values() for p in m.parameters()})}))
"""


@pytest.mark.heavy
@pytest.mark.parametrize("kind, dtype", [("base", "float16"), ("refiner", "bfloat16")])
def test_full_size_streaming_load_peak_memory(kind, dtype):
    manifest = MANIFESTS / f"sdxl_{kind}_manifest.json"
    if not manifest.is_file():
        pytest.skip("manifests not available")
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        path = Path(folder) / f"sdxl_{kind}_random.safetensors"
        write_from_manifest(manifest, path)
        done = subprocess.run([sys.executable, "-c", _LOADER, str(path), dtype], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[2], timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{kind} -> {dtype}: weights {result['weights'] / 1e9:.2f} GB, baseline {result['baseline'] / 1e9:.2f} GB,"
          f" peak {result['peak'] / 1e9:.2f} GB, load {result['seconds']:.1f} s")
    assert result["config_ok"] and result["dtypes"] == [f"torch.{dtype}"]
    # Weights plus the largest single tensor (bigG's 49408x1280 token embedding, 126 MB in fp16) and slack for
    # transient conversion buffers: far below the two full copies a non-streaming load needs.
    growth = result["peak"] - result["baseline"]
    assert growth < 1.10 * result["weights"] + 400e6, result
