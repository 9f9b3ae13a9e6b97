"""The demo's embedded models: tiny, deterministic, random-weight SDXL base and refiner checkpoints.

They are written once in the original single-file layout and then loaded through the real loader, so a new user
sees the whole path (checkpoint detection, prompt encoding, base → refiner handoff, decode) work in seconds on a
CPU without downloading anything. Random weights make an abstract picture, not a lighthouse.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..checkpoints.loading import save_checkpoint
from ..config import TINY_BASE, TINY_REFINER, SDXLConfig
from ..models.bundle import SDXLModel
from ..models.unet import UNetModel
from ..models.vae import AutoencoderKL
from ..runtime.atomic_write import describe_os_error
from ..text.encoders import TextEncoder
from ..text.tokenizer import SDXLTokenizer

# Bump when the tiny configs or the weight recipe change, so stale cached files are not reused.
DEMO_VERSION = 1
_SEEDS = {"base": 20230704, "refiner": 20230726}  # the SDXL paper's arXiv and the 1.0 release dates


def demo_cache_dir() -> Path:
    """Where the demo checkpoints live: $SDXL_CORE_CACHE, else the user's cache folder."""
    root = os.environ.get("SDXL_CORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "sdxl_core")
    return Path(root) / f"demo-v{DEMO_VERSION}"


def build_random_model(config: SDXLConfig, seed: int) -> SDXLModel:
    """An SDXL stage with deterministic random weights (PyTorch's default initialisation under a fixed seed)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNetModel(config.unet)
        vae = AutoencoderKL(config.vae)
        clip_g = TextEncoder(config.clip_g)
        clip_l = TextEncoder(config.clip_l) if config.clip_l is not None else None
    finally:
        torch.random.set_rng_state(state)
    return SDXLModel(config=config, unet=unet, vae=vae, clip_g=clip_g, clip_l=clip_l, tokenizer=SDXLTokenizer(),
                     source=None, dtype=torch.float32)


def demo_checkpoints(cache_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the tiny base and refiner checkpoints, written on first use (atomically: a crash leaves no file).

    Raises a ValueError in a sentence when the cache folder cannot be created or written."""
    folder = cache_dir or demo_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"the demo cannot create its cache folder {folder} ({describe_os_error(error)}); set "
                         "SDXL_CORE_CACHE to a folder you can write to") from None
    paths = {}
    for kind, config in (("base", TINY_BASE), ("refiner", TINY_REFINER)):
        path = folder / f"tiny_sdxl_{kind}.safetensors"
        if not path.exists():  # written whole or not at all (save_checkpoint writes atomically)
            save_checkpoint(build_random_model(config, _SEEDS[kind]), path, dtype=torch.float16)
        paths[kind] = path
    return paths
