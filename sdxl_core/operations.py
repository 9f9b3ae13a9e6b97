"""The layer classes a network computes with, swappable: storage precision apart from compute precision.

Every network here (UNet, VAE, both text encoders) is built from five torch layer types. `use_operations` swaps
them for the same-named classes of an operations namespace, the way ComfyUI hands its networks `comfy.ops`:

- `torch.nn` (the default): weights are used as stored; a network computes in its weights' dtype.
- `manual_cast` (this module): weights stay in their storage dtype (e.g. the fp16 of the file) and each layer casts
  them to its input's dtype as it runs, so a CPU computes in fp32 while holding half the bytes. Only one layer's
  weights exist in fp32 at a time. Casting fp16 or bf16 to fp32 is exact, so an fp16 file computed this way gives
  the same bits as the same file loaded as fp32 weights.
- any namespace with subclasses of those five torch classes, e.g. ComfyUI's `comfy.ops.manual_cast` (whose layers
  cast to the input's device as well, which is how ComfyUI streams weights onto small GPUs). The core never imports
  ComfyUI; the ComfyUI nodes pass the namespace in.

The swap changes each layer's class, not its parameters, so state dicts, residency plans and LoRA merges see the
same tensors under the same names. `compute_dtype` is what the network casts its inputs to; the text encoders'
embedding outputs are cast to it too (an embedding's input is token ids, which carry no dtype to follow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv2d": nn.Conv2d, "GroupNorm": nn.GroupNorm, "LayerNorm": nn.LayerNorm,
    "Embedding": nn.Embedding,
}


def _like(tensor: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """`tensor` in `x`'s dtype and on its device (no copy when it already is)."""
    if tensor is None:
        return None
    return tensor.to(device=x.device, dtype=x.dtype, non_blocking=True)


class manual_cast:  # noqa: N801 - a namespace named like the `torch.nn` and `comfy.ops.*` it stands in for
    """Layers that keep their weights in storage precision and compute in their input's precision."""

    class Linear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, _like(self.weight, x), _like(self.bias, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, _like(self.weight, x), _like(self.bias, x))

    class GroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.num_groups, _like(self.weight, x), _like(self.bias, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, _like(self.weight, x), _like(self.bias, x), self.eps)

    class Embedding(nn.Embedding):
        """A row lookup needs no cast: the rows come out in storage precision and `use_operations` casts them to
        the compute dtype (exactly, for fp16/bf16 rows and fp32 compute)."""


def use_operations(network: nn.Module, operations=None, compute_dtype: torch.dtype | None = None) -> None:
    """Swap the layers of `network` for `operations`' classes (None or `torch.nn`: keep them) and make it compute
    in `compute_dtype` (None: its weights' dtype). Sets `network.operations` (None for torch.nn: a module object
    would make the network impossible to deep-copy) and `network.compute_dtype`."""
    network.operations = None if operations is None or operations is nn else operations
    network.compute_dtype = compute_dtype
    if network.operations is not None:
        replacements = {}
        for name, base in LAYER_TYPES.items():
            replacement = getattr(operations, name, None)
            if not (isinstance(replacement, type) and issubclass(replacement, base)):
                raise TypeError(f"the operations namespace {getattr(operations, '__name__', operations)!r} "
                                f"needs a {name} class derived from torch.nn.{name} (as torch.nn, "
                                f"sdxl_core.operations.manual_cast and comfy.ops.* have), got {replacement!r}")
            replacements[base] = replacement
        for module in network.modules():
            replacement = replacements.get(type(module))
            if replacement is not None:
                module.__class__ = replacement
    if compute_dtype is not None:
        for module in network.modules():
            if isinstance(module, nn.Embedding):
                module.register_forward_hook(_cast_output(compute_dtype))


def _cast_output(dtype: torch.dtype):
    def hook(_module, _inputs, output):
        return output.to(dtype)

    return hook


def compute_dtype_of(network: nn.Module) -> torch.dtype:
    """The dtype `network` computes in: its `compute_dtype` when set, else its first floating weight's dtype."""
    dtype = getattr(network, "compute_dtype", None)
    if dtype is not None:
        return dtype
    return next(p.dtype for p in network.parameters() if p.is_floating_point())
