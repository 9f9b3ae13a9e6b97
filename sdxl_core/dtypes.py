"""The precisions a user can name (on the command line, in a node widget, in a benchmark), declared once."""

from __future__ import annotations

import torch

DTYPES_BY_NAME: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

