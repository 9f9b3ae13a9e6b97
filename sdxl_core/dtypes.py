"""The precisions a user can name (on the command line, in a node widget, in a benchmark), declared once."""

from __future__ import annotations

import torch

DTYPES_BY_NAME: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype for "fp32" / "fp16" / "bf16", or a sentence listing those names."""
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"unknown precision {name!r}; expected one of: {', '.join(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[name]
