"""Resolve what the user pointed at (a .safetensors file or a diffusers folder) into original-layout lazy tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .detect import VAE_PREFIX, Identification, identify
from .diffusers_layout import is_diffusers_folder, is_diffusers_vae, read_diffusers_folder, vae_from_diffusers
from .errors import CheckpointNotFoundError
from .files import LazyTensor, read_header, read_sharded

_VAE_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass
class CheckpointSource:
    """Everything known about a checkpoint before any tensor is read."""

    path: Path
    format: str  # "safetensors file" or "diffusers folder"
    layout: str  # "original" (sgm/ldm names) or "diffusers" (converted on the fly)
    tensors: dict[str, LazyTensor]  # original-layout names (diffusers folders and VAE files already mapped)
    hints: dict[str, str] = field(default_factory=dict)  # facts shapes do not carry (see detect.py)
    files: list[Path] = field(default_factory=list)
    identification: Identification | None = None

    @property
    def shapes(self) -> dict[str, tuple]:
        return {key: tensor.shape for key, tensor in self.tensors.items()}


def open_source(path: Path | str) -> CheckpointSource:
    """Read the header(s) of a safetensors file or diffusers folder; identify the content from keys and shapes.

    A VAE-only file (original or diffusers names, with or without `first_stage_model.`) comes back with
    `first_stage_model.`-prefixed original names, so every VAE looks the same to the loader.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if is_diffusers_folder(path):
            tensors, hints, files = read_diffusers_folder(path)
            source = CheckpointSource(path, "diffusers folder", "diffusers", tensors, hints, files)
        elif any((path / name).is_file() or (path / f"{name}.index.json").is_file() for name in _VAE_FOLDER_WEIGHTS):
            tensors, metadata, used = read_sharded(path, _VAE_FOLDER_WEIGHTS, "VAE")
            source = CheckpointSource(path, "diffusers folder", "diffusers", tensors, dict(metadata), [used])
        else:
            raise CheckpointNotFoundError(f"{path} is a folder but not a diffusers model folder (no model_index.json "
                                          "and no diffusion_pytorch_model.safetensors)")
    elif path.exists():
        header = read_header(path)
        source = CheckpointSource(path, "safetensors file", "original", dict(header.tensors), dict(header.metadata),
                                  [path])
    else:
        raise CheckpointNotFoundError(f"{path}: no such file or folder")
    source.identification = identify(source.shapes)
    if source.identification.kind == "sdxl-vae":
        _normalise_vae(source)
    return source


def _normalise_vae(source: CheckpointSource) -> None:
    if any(key.startswith(VAE_PREFIX) for key in source.tensors):
        return
    if is_diffusers_vae(source.tensors):
        source.tensors = vae_from_diffusers(source.tensors)
        source.layout = "diffusers"
    else:
        source.tensors = {VAE_PREFIX + key: tensor for key, tensor in source.tensors.items()}
