"""Counting the reads of tensor values into Python, the host synchronisations a GPU loop must not do per step."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value into Python (`.item()`, `bool()`, `float()`): on a GPU each one makes
    the host wait for every kernel queued before it. Works on the CPU, where the same calls happen."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))
