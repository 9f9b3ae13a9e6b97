#!/usr/bin/env python3
"""Peak device memory of each SDXL stage at full size, measured on any machine, and the project's estimates of it.

The full-size networks run on fake tensors (`torch._subclasses.FakeTensorMode`: shapes and dtypes, no data, no
arithmetic), under PyTorch's own `MemTracker`, which follows every tensor's storage from allocation to release.
What it reports is the peak of live tensor bytes: a floor for a GPU, where the caching allocator's fragmentation
and cuDNN workspaces come on top, and exact for what the code keeps alive. It needs no GPU and no weights, so the
numbers behind `sdxl_core.runtime.residency.UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL`, `vae_decoding`'s decode/encode
estimates and the 8 GB residency plan can be checked here, then against a real card with bench_sdxl.py.

    python benchmarks/activation_memory.py                    # 1024x1024, half precision, CFG batch 2
    python benchmarks/activation_memory.py --size 1216 832 --json memory.json

Attention runs PyTorch's fused kernel here (no attention matrix is kept), as flash / memory-efficient attention
does on a GPU; the VAE's one 512-wide attention head may fall back to a kernel that keeps the matrix on some GPUs
(0.5 GiB more at 1024x1024), which is why `vae_decoding` doubles its estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sdxl_core.config import SDXL_BASE, SDXL_REFINER, UNetConfig, VAEConfig  # noqa: E402
from sdxl_core.dtypes import DTYPES_BY_NAME  # noqa: E402
from sdxl_core.models.unet import UNetModel  # noqa: E402
from sdxl_core.models.vae import AutoencoderKL  # noqa: E402
from sdxl_core.runtime.residency import (  # noqa: E402
    DEFAULT_ACTIVATION_RESERVE,
    UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL,
    GiB,
    unet_activation_bytes,
)
from sdxl_core.runtime.vae_decoding import estimate_decode_bytes, estimate_encode_bytes  # noqa: E402

DTYPES = DTYPES_BY_NAME


@dataclass
class Measurement:
    what: str
    weights_bytes: int
    activation_peak_bytes: int  # live tensors beyond the weights at the peak
    estimate_bytes: int  # what the project reserves or asks for next to the weights
    seconds: float

    @property
    def covered(self) -> float:
        return self.estimate_bytes / self.activation_peak_bytes


def _memory_tracker():
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as error:  # a private module of PyTorch: present since 2.5, not promised
        raise SystemExit(f"this PyTorch ({torch.__version__}) has no torch.distributed._tools.mem_tracker "
                         f"({error}); PyTorch 2.5 or newer is needed") from None
    return MemTracker


def _peak(module: torch.nn.Module, call, *inputs: torch.Tensor) -> tuple[int, int, float]:
    """(weight bytes, activation peak bytes, seconds) of `call(*inputs)` on fake tensors."""
    tracker = _memory_tracker()()
    tracker.track_external(module, *inputs)
    begin = time.perf_counter()
    with tracker, torch.inference_mode():
        call(*inputs)
    peak = tracker.get_tracker_snapshot("peak")
    (per_device,) = peak.values()
    weights = sum(value for kind, value in per_device.items() if getattr(kind, "name", None) in ("PARAM", "BUFFER"))
    total = per_device["Total"]
    # The inputs are counted too (as "other"); they exist before and after the call, so they are not activations.
    inputs_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return weights, total - weights - inputs_bytes, time.perf_counter() - begin


def measure_unet(name: str, config: UNetConfig, dtype: torch.dtype, batch: int, latent_h: int, latent_w: int
                 ) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        unet = UNetModel(config, dtype=dtype).eval()
        inputs = (torch.randn(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
                  torch.full((batch,), 801.0),
                  torch.randn(batch, 77, config.context_dim, dtype=dtype),
                  torch.randn(batch, config.adm_in_channels, dtype=dtype))
        weights, activations, seconds = _peak(unet, unet, *inputs)
        estimate = unet_activation_bytes(unet, batch, latent_h, latent_w)
    return Measurement(f"{name} UNet, batch {batch}", weights, activations, estimate, seconds)


def measure_vae(config: VAEConfig, dtype: torch.dtype, height: int, width: int) -> list[Measurement]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    scale = config.downscale
    results = []
    with FakeTensorMode():
        vae = AutoencoderKL(config, dtype=dtype).eval()
        latent = torch.randn(1, config.latent_channels, height // scale, width // scale, dtype=dtype)
        weights, activations, seconds = _peak(vae, vae.decode, latent)
        results.append(Measurement("VAE decode", weights, activations,
                                   estimate_decode_bytes(vae, 1, height, width, dtype), seconds))
        image = torch.randn(1, config.image_channels, height, width, dtype=dtype)
        weights, activations, seconds = _peak(vae, lambda x: vae.encode(x, sample=False), image)
        results.append(Measurement("VAE encode", weights, activations,
                                   estimate_encode_bytes(vae, 1, height, width, dtype), seconds))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(1024, 1024), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="UNet precision (default fp16)")
    parser.add_argument("--vae-dtype", choices=tuple(DTYPES), default="bf16",
                        help="VAE precision (default bf16, the project's default on a GPU)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch: 2 = one guided step (default)")
    parser.add_argument("--card-gib", type=float, default=7.5,
                        help="usable memory of the card the residency plan is checked for (default 7.5: an 8 GB "
                             "card less the CUDA context)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    width, height = args.size
    if width % 8 or height % 8:
        parser.error(f"--size must be multiples of 8 (the VAE's downscale); got {width}x{height}")
    dtype, vae_dtype = DTYPES[args.dtype], DTYPES[args.vae_dtype]

    results = [measure_unet(kind, config.unet, dtype, args.batch, height // 8, width // 8)
               for kind, config in (("base", SDXL_BASE), ("refiner", SDXL_REFINER))]
    results += measure_vae(SDXL_BASE.vae, vae_dtype, height, width)

    print(f"## Peak live tensors, {width}x{height}, UNet {args.dtype} batch {args.batch}, VAE {args.vae_dtype} "
          f"(fake tensors, torch {torch.__version__})\n")
    print("| stage | weights (GiB) | activation peak (GiB) | project's estimate (GiB) | estimate / peak |")
    print("|---|---:|---:|---:|---:|")
    for m in results:
        print(f"| {m.what} | {m.weights_bytes / GiB:.3f} | {m.activation_peak_bytes / GiB:.3f} | "
              f"{m.estimate_bytes / GiB:.3f} | {m.covered:.2f} |")
    cells = args.batch * (height // 8) * (width // 8)
    per_cell = {m.what: m.activation_peak_bytes / cells / DTYPES[args.dtype].itemsize for m in results[:2]}
    print("\nUNet activation elements per latent cell of each sample: "
          + ", ".join(f"{what} {value:.0f}" for what, value in per_cell.items())
          + f" (the project asks for {UNET_ACTIVATION_ELEMENTS_PER_LATENT_CELL})")

    # The residency plan holds one stage's weights at a time; each stage's peak is its weights plus activations.
    card = args.card_gib * GiB
    budget = card - DEFAULT_ACTIVATION_RESERVE
    stage_peaks = {m.what: m.weights_bytes + m.activation_peak_bytes for m in results}
    worst = max(stage_peaks, key=stage_peaks.get)
    print(f"\n{args.card_gib:g} GiB card: weight budget {budget / GiB:.2f} GiB; largest stage {worst} needs "
          f"{stage_peaks[worst] / GiB:.2f} GiB of live tensors ({(card - stage_peaks[worst]) / GiB:.2f} GiB left "
          f"for the allocator)")
    failures = [m.what for m in results if m.covered < 1.0]
    if args.json is not None:
        args.json.write_text(json.dumps({
            "size": [width, height], "dtype": args.dtype, "vae_dtype": args.vae_dtype, "batch": args.batch,
            "torch": torch.__version__, "measurements": [asdict(m) for m in results],
            "unet_elements_per_cell": per_cell, "card_gib": args.card_gib,
            "stage_peak_bytes": stage_peaks, "estimates_short": failures}, indent=2))
    if failures:
        print(f"\nESTIMATE TOO SMALL for: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
