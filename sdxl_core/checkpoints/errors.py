"""Why a checkpoint cannot be loaded: one exception class per reason, all of them `CheckpointError(ValueError)`.

Callers (the CLI, the ComfyUI loader nodes) catch `CheckpointError` and show its message; the message alone must
say what was expected, what was found and what to do, so no traceback is needed to understand it.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file or folder that these SDXL loaders cannot use."""


class CheckpointNotFoundError(CheckpointError):
    """The path does not exist or is not a file/folder we can read."""


class CorruptCheckpointError(CheckpointError):
    """Truncated download, damaged header or tensor data that does not match the header."""


class UnsafeFormatError(CheckpointError):
    """A pickle-based file (.ckpt/.pt/.bin): loading it could run arbitrary code, so it is refused."""


class UnsupportedFormatError(CheckpointError):
    """A file that is neither safetensors nor pickle (GGUF, a web page saved as a model, an LFS pointer, ...)."""


class WrongArchitectureError(CheckpointError):
    """A checkpoint of another model family (SD 1.x, SD 2.x, SD3, Flux, ...)."""


class WrongComponentError(CheckpointError):
    """An SDXL file of the wrong kind here: a VAE-only file given as a checkpoint, a LoRA, a bare UNet, ..."""


class WrongVariantError(CheckpointError):
    """An SDXL refiner where a base is required, or the reverse."""


class StateDictMismatchError(CheckpointError):
    """Strict validation failed: missing, unexpected or mis-shaped tensors (the report lists them)."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteWeightError(CheckpointError):
    """A weight holds NaN or Inf values (a broken merge or fine-tune), or overflows the requested dtype."""
