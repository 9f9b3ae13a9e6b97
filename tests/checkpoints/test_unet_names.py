"""sdxl_core.checkpoints.unet_names: the one ldm <-> diffusers UNet name table, against diffusers' own converter.

The reference is diffusers' single-file conversion (`convert_ldm_unet_checkpoint`), run on the published UNet key
lists of the full-size base and refiner (tests/data/manifests) with each key as its own value, so the converter's
output says which diffusers name it gives every original name; no tensor is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdxl_core.checkpoints.unet_names import UNetNameTable
from sdxl_core.config import (
    ADM_SCALAR_EMBED_DIM,
    SDXL_BASE,
    SDXL_REFINER,
    TINY_BASE,
    TINY_REFINER,
)

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"
UNET_PREFIX = "model.diffusion_model."


def _unet_shapes(kind: str) -> dict[str, tuple]:
    path = MANIFESTS / f"sdxl_{kind}_manifest.json"
    if not path.is_file():
        pytest.skip(f"manifest {path} not available")
    return {key: tuple(entry["shape"]) for key, entry in json.loads(path.read_text()).items()
            if key.startswith(UNET_PREFIX)}


def _diffusers_names(config, shapes: dict[str, tuple]) -> dict[str, str]:
    """Original UNet key (unprefixed) -> the diffusers key diffusers' converter files it under."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from tests._diffusers_twins import sgm_network_config

    # The config reader looks at shapes (meta tensors: nothing allocated); the converter only moves values, so
    # there each value is its own source key.
    with torch.device("meta"):
        tensors = {key: torch.empty(shape) for key, shape in shapes.items()}
    diffusers_config = single_file.create_unet_diffusers_config_from_ldm(sgm_network_config(config), tensors)
    checkpoint = {key: key for key in shapes}
    diffusers_config.update(class_embed_type=None, addition_embed_type="text_time",
                            addition_time_embed_dim=ADM_SCALAR_EMBED_DIM)
    converted = single_file.convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    return {source[len(UNET_PREFIX):]: name for name, source in converted.items()}


@pytest.mark.parametrize("kind, config", [("base", SDXL_BASE), ("refiner", SDXL_REFINER)])
def test_full_size_table_is_diffusers_converter(kind, config):
    shapes = _unet_shapes(kind)
    keys = [key[len(UNET_PREFIX):] for key in shapes]
    reference = _diffusers_names(config.unet, shapes)
    assert sorted(reference) == sorted(keys)  # the converter itself places every key exactly once
    table = UNetNameTable.for_config(config.unet)
    ours = {key: table.to_diffusers(key) for key in keys}
    assert ours == reference
    assert {name: table.from_diffusers(name) for name in reference.values()} == {v: k for k, v in reference.items()}


@pytest.mark.parametrize("config", [TINY_BASE, TINY_REFINER], ids=["tiny-base", "tiny-refiner"])
def test_tiny_table_round_trips_every_parameter(config):
    from sdxl_core.models.unet import UNetModel

    keys = list(UNetModel(config.unet, device="meta").state_dict())
    table = UNetNameTable.for_config(config.unet)
    names = {key: table.to_diffusers(key) for key in keys}
    assert None not in names.values() and len(set(names.values())) == len(keys)
    assert all(table.from_diffusers(name) == key for key, name in names.items())


def test_names_outside_the_topology_are_unknown():
    table = UNetNameTable.for_config(SDXL_BASE.unet)
    assert table.to_diffusers("input_blocks.1.1.proj_in.weight") is None  # level 0 of SDXL has no attention
    assert table.from_diffusers("down_blocks.0.attentions.0.proj_in.weight") is None
    assert table.from_diffusers("down_blocks.2.downsamplers.0.conv.weight") is None  # the deepest level keeps size
    assert table.from_diffusers("down_blocks.0.resnets.0.unknown.weight") is None
    assert table.to_diffusers("input_blocks.1.0.in_layers.2.weight") == "down_blocks.0.resnets.0.conv1.weight"
    with pytest.raises(ValueError, match="at least one level"):
        UNetNameTable(2, [])
