"""Shared by the node tests: the pack's nodes by short name, and model folders holding the tiny checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

import nodes
from nodes import comfy_host

PREFIX = "SDXLTwoStage."


def node(name: str):
    """A fresh instance of one of the pack's nodes (ComfyUI makes one per graph node)."""
    return nodes.NODE_CLASS_MAPPINGS[PREFIX + name]()


def node_class(name: str) -> type:
    return nodes.NODE_CLASS_MAPPINGS[PREFIX + name]


def model_folders(root: Path, checkpoints: dict[str, Path]) -> dict[str, list[str]]:
    """checkpoints/ with the tiny base and refiner, vae/ with the base's VAE as a separate file (original names)."""
    from sdxl_core.checkpoints.loading import load_checkpoint

    ckpt_dir, vae_dir = root / "checkpoints", root / "vae"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    vae_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in checkpoints.items():
        shutil.copyfile(path, ckpt_dir / f"tiny_sdxl_{kind}.safetensors")
    base = load_checkpoint(checkpoints["base"])
    save_file({k: v.contiguous() for k, v in base.vae.state_dict().items()}, str(vae_dir / "tiny_sdxl_vae.safetensors"))
    (ckpt_dir / "notes.txt").write_text("not a model: must not be listed")
    return {"checkpoints": [str(ckpt_dir)], "vae": [str(vae_dir)]}


def use_folders(folders: dict[str, list[str]]) -> None:
    comfy_host.set_standalone_model_folders(folders)
