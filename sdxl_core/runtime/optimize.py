"""Opt-in speed levers for a loaded UNet, each one reversible or layout-preserving and each one measured by
`benchmarks/bench_sdxl.py` before it becomes a default (docs/performance.md#how-to-compare: time, on the same card,
against diffusers).

- `fuse_qkv`: self-attention q/k/v (and cross-attention k/v) as one Linear each: one GEMM launch instead of three
  (the PyTorch "Accelerating Generative AI Part III" recipe; diffusers `fuse_qkv_projections`). Done as a module
  swap whose state-dict hooks save and load the checkpoint's separate `to_q` / `to_k` / `to_v` layout, so a fused
  UNet still round-trips through `save_checkpoint` / `load_state_dict`, and fusion works on a meta-built model
  before its weights are assigned.
- `to_channels_last`: 4-D conv weights in NHWC; cuDNN then keeps activations NHWC end to end, and the spatial
  transformers' [B, C, H, W] <-> [B, H*W, C] reshapes become free views instead of copies.
- `compile_unet`: `nn.Module.compile` in place (state-dict keys unchanged, unlike `torch.compile(module)`), with the
  one-time compile cost measured on a first call at the fixed sampling shape.
- `CUDAGraphStep`: the fixed-shape UNet step captured once as a CUDA graph and replayed (CUDA only).
- `attention_backend`: a context choosing SDPA's kernel (flash, memory-efficient, cuDNN, math).

Every lever computes the same function: tests/runtime/test_optimize.py checks fp32 parity on the tiny configs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.unet import Attention, BasicTransformerBlock

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Fused projections


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, _ = t.shape
    return t.view(batch, length, heads, -1).transpose(1, 2)


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One bias-free Linear whose output rows are the given Linears' rows, in order (weights concatenated)."""
    if any(p.bias is not None for p in parts):
        raise ValueError("only bias-free projections are fused (SDXL's q/k/v have no bias)")
    weight = torch.cat([p.weight.detach() for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
    return fused


class _SplitLayout:
    """State-dict hooks that present one fused weight as the checkpoint's separate projection weights."""

    fused_name: str
    part_names: tuple[str, ...]

    def _install_layout_hooks(self) -> None:
        self.register_state_dict_post_hook(_save_split)
        self.register_load_state_dict_pre_hook(_load_split)


def _save_split(module: _SplitLayout, state_dict: dict, prefix: str, _metadata) -> None:
    """Replace `<fused>.weight` by the part weights (views of it: no copy) under their checkpoint names."""
    fused = state_dict.pop(f"{prefix}{module.fused_name}.weight", None)
    if fused is None:
        return
    for name, part in zip(module.part_names, fused.chunk(len(module.part_names))):
        state_dict[f"{prefix}{name}.weight"] = part


def _load_split(module: _SplitLayout, state_dict: dict, prefix: str, *_args) -> None:
    """Concatenate the checkpoint's part weights into `<fused>.weight`; leave a partial set for strict loading
    to report (the fused key then shows up as missing and the parts as unexpected)."""
    keys = [f"{prefix}{name}.weight" for name in module.part_names]
    if all(k in state_dict for k in keys):
        state_dict[f"{prefix}{module.fused_name}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


class FusedSelfAttention(_SplitLayout, nn.Module):
    """Self-attention with q, k, v from one Linear (same math as `unet.Attention` with context=None)."""

    fused_name = "to_qkv"
    part_names = ("to_q", "to_k", "to_v")

    def __init__(self, source: Attention):
        super().__init__()
        if source.to_q.in_features != source.to_k.in_features:
            raise ValueError("this attention projects a context of another width: it is cross-attention")
        self.heads = source.heads
        self.to_qkv = _fused_linear([source.to_q, source.to_k, source.to_v])
        self.to_out = source.to_out
        self._install_layout_hooks()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            raise ValueError("FusedSelfAttention attends over its input only; it takes no context")
        batch, length, _ = x.shape
        # [B, L, 3 * inner] -> three [B, heads, L, head_dim] views; SDPA only needs the last dim contiguous.
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))

    def unfused(self) -> Attention:
        q, k, v = self.to_qkv.weight.detach().chunk(3)
        return _attention_from(self.heads, q, k, v, self.to_out)


class FusedCrossAttention(_SplitLayout, nn.Module):
    """Cross-attention with k and v of the context from one Linear (q stays separate: it reads the image tokens)."""

    fused_name = "to_kv"
    part_names = ("to_k", "to_v")

    def __init__(self, source: Attention):
        super().__init__()
        self.heads = source.heads
        self.to_q = source.to_q
        self.to_kv = _fused_linear([source.to_k, source.to_v])
        self.to_out = source.to_out
        self._install_layout_hooks()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("FusedCrossAttention needs the text context")
        batch, length, _ = x.shape
        q = _split_heads(self.to_q(x), self.heads)
        k, v = self.to_kv(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))

    def unfused(self) -> Attention:
        k, v = self.to_kv.weight.detach().chunk(2)
        return _attention_from(self.heads, self.to_q.weight.detach(), k, v, self.to_out)


def _attention_from(heads: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, to_out: nn.Sequential
                    ) -> Attention:
    inner, query_dim = q.shape
    attention = Attention(query_dim, k.shape[1], heads, inner // heads, device="meta", dtype=q.dtype)
    for name, weight in (("to_q", q), ("to_k", k), ("to_v", v)):
        # clone: the parts are views of the fused weight, which would otherwise stay alive behind them.
        getattr(attention, name).weight = nn.Parameter(weight.clone(), requires_grad=False)
    attention.to_out = to_out
    return attention


def fuse_qkv(unet: nn.Module) -> int:
    """Swap every transformer block's attentions for fused ones, in place; returns how many were swapped.

    Works before weights are loaded too (a meta-built UNet): `load_state_dict` then takes the checkpoint layout.
    """
    swapped = 0
    for block in unet.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        if type(block.attn1) is Attention:
            block.attn1 = FusedSelfAttention(block.attn1)
            swapped += 1
        if type(block.attn2) is Attention:
            block.attn2 = FusedCrossAttention(block.attn2)
            swapped += 1
    return swapped


def unfuse_qkv(unet: nn.Module) -> int:
    """Undo `fuse_qkv` in place (separate q/k/v Linears again); returns how many attentions were swapped back."""
    swapped = 0
    for block in unet.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for name in ("attn1", "attn2"):
            attention = getattr(block, name)
            if isinstance(attention, (FusedSelfAttention, FusedCrossAttention)):
                setattr(block, name, attention.unfused())
                swapped += 1
    return swapped


def is_qkv_fused(unet: nn.Module) -> bool:
    return any(isinstance(m, (FusedSelfAttention, FusedCrossAttention)) for m in unet.modules())


# ---------------------------------------------------------------------------------------------------------------
# Memory format


def to_channels_last(module: nn.Module) -> nn.Module:
    """4-D weights (convolutions) in channels-last order, in place; returns the module."""
    return module.to(memory_format=torch.channels_last)


def to_contiguous_format(module: nn.Module) -> nn.Module:
    """Undo `to_channels_last` in place; returns the module."""
    return module.to(memory_format=torch.contiguous_format)


def uses_channels_last(module: nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.ndim == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


# ---------------------------------------------------------------------------------------------------------------
# torch.compile


@dataclass(frozen=True)
class CompileReport:
    """What compiling cost: the first call at the fixed shape (tracing + code generation + one run) and a
    steady-state call after it; their difference is the one-time compile cost."""

    mode: str
    first_call_s: float
    steady_call_s: float

    @property
    def compile_s(self) -> float:
        return max(self.first_call_s - self.steady_call_s, 0.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_unet(unet: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, mode: str = "default",
                 dynamic: bool = False, fullgraph: bool = False) -> CompileReport:
    """`nn.Module.compile` the UNet in place and pay the compile cost now, on `example_inputs` (x, t, context, y
    at the sampling shape: batch 2 for guidance). Static shapes: a new latent size recompiles once more."""
    if not hasattr(unet, "compile"):
        raise RuntimeError(f"torch {torch.__version__} has no nn.Module.compile; PyTorch 2.2 or newer is needed")
    device = example_inputs[0].device
    unet.compile(mode=mode, dynamic=dynamic, fullgraph=fullgraph)
    timings = []
    try:
        with torch.inference_mode():
            for _ in range(2):
                _synchronize(device)
                start = time.perf_counter()
                unet(*example_inputs)
                _synchronize(device)
                timings.append(time.perf_counter() - start)
    except Exception:
        uncompile(unet)  # a failed compile must not leave every later call failing the same way
        raise
    return CompileReport(mode=mode, first_call_s=timings[0], steady_call_s=timings[1])


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def uncompile(module: nn.Module) -> None:
    """Undo `nn.Module.compile` in place: calls run the eager forward again.

    nn.Module has no public inverse of `compile()`; it stores the compiled callable in `_compiled_call_impl`, and
    clearing that attribute is exactly what restores `__call__`'s eager path.
    """
    if is_compiled(module):
        module._compiled_call_impl = None


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs


class CUDAGraphStep:
    """A module's forward captured as CUDA graphs, one per input signature, and replayed (CUDA only).

    The module must be shape-static and free of host synchronisation (the SDXL UNet is). Inputs are copied into
    the graph's static buffers and the output is cloned out, so callers never see a buffer the next replay
    overwrites. A graph bakes in the weights' addresses: if the weights moved (offloading, `.to()`), the graph is
    captured again.
    """

    def __init__(self, module: nn.Module, *, warmup: int = 2, max_graphs: int = 4):
        first = next(module.parameters(), None)
        if first is None or first.device.type != "cuda":
            found = "no parameters" if first is None else f"parameters on {first.device}"
            raise RuntimeError(f"CUDA graphs need a module on a CUDA device; this one has {found}")
        self.module = module
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._pool = None
        self._weights_at = self._weight_addresses()
        self.captures = 0

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.module.parameters())

    @staticmethod
    def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, t.device, t.stride()) for t in inputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]):
        static_inputs = tuple(t.detach().clone() for t in inputs)
        stream = torch.cuda.Stream(device=inputs[0].device)
        stream.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):  # cuDNN / cuBLAS pick their algorithms outside the capture
                self.module(*static_inputs)
        torch.cuda.current_stream(inputs[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
            static_output = self.module(*static_inputs)
        self._pool = graph.pool()
        self.captures += 1
        return graph, static_inputs, static_output

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        addresses = self._weight_addresses()
        if addresses != self._weights_at:
            logger.info("UNet weights moved since the CUDA graphs were captured; capturing again")
            self._graphs.clear()
            self._pool = None
            self._weights_at = addresses
        key = self._signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(f"CUDAGraphStep already holds {self.max_graphs} graphs for other input shapes; "
                                   "a graph per shape costs memory: use one latent size per sampler run")
            entry = self._graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = entry
        for buffer, value in zip(static_inputs, inputs):
            buffer.copy_(value)
        graph.replay()
        return static_output.clone()


# ---------------------------------------------------------------------------------------------------------------
# Attention backend


ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")


def _sdpa_backends() -> dict[str, list]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as error:
        raise RuntimeError(f"torch {torch.__version__} cannot choose SDPA kernels (torch.nn.attention.sdpa_kernel "
                           "arrived in PyTorch 2.3); use attention='auto'") from error

    return {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "math": [SDPBackend.MATH],
    }


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Run `scaled_dot_product_attention` calls inside with one SDPA kernel family only ("auto" = PyTorch's pick).

    An unsupported choice (e.g. flash on the CPU for some shapes, cuDNN on an old GPU) fails at the first attention
    call with PyTorch's "No available kernel" / "No viable backend" error rather than silently using another kernel.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {ATTENTION_BACKENDS}")
    if name == "auto":
        yield
        return
    backends = _sdpa_backends()
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends[name]):
        yield


# ---------------------------------------------------------------------------------------------------------------
# All levers at once


@dataclass(frozen=True)
class UNetOptimizations:
    """Which levers to apply; all off is the plain eager UNet."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile_mode: str | None = None  # None = eager; else a torch.compile mode ("default", "max-autotune", ...)
    cuda_graph: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; expected one of {ATTENTION_BACKENDS}")
        if self.cuda_graph and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile mode {self.compile_mode!r} already uses CUDA graphs; drop cuda_graph")

    def label(self) -> str:
        parts = [name for name, on in (("fused-qkv", self.fuse_qkv), ("channels-last", self.channels_last)) if on]
        if self.compile_mode:
            parts.append(f"compile:{self.compile_mode}")
        if self.cuda_graph:
            parts.append("cuda-graph")
        if self.attention != "auto":
            parts.append(f"attn:{self.attention}")
        return "+".join(parts) or "eager"


class OptimizedStep:
    """The UNet as a `(x, t, context, y) -> eps` callable with the chosen levers; `.unet` is the (modified in
    place) module, whose state dict keeps the checkpoint layout."""

    def __init__(self, unet: nn.Module, settings: UNetOptimizations, example_inputs: tuple[torch.Tensor, ...] | None):
        self.unet = unet
        self.settings = settings
        self.compile_report: CompileReport | None = None
        if settings.fuse_qkv and not is_qkv_fused(unet):
            fuse_qkv(unet)
        if settings.channels_last:
            to_channels_last(unet)
        if settings.compile_mode is not None or settings.cuda_graph:
            if example_inputs is None:
                raise ValueError("compiling or capturing CUDA graphs needs example inputs at the sampling shape")
        with attention_backend(settings.attention):
            if settings.compile_mode is not None:
                self.compile_report = compile_unet(unet, example_inputs, mode=settings.compile_mode)
        self._call: Callable[..., torch.Tensor] = CUDAGraphStep(unet) if settings.cuda_graph else unet
        if settings.cuda_graph:
            with attention_backend(settings.attention):
                self._call(*example_inputs)  # capture now, so the first sampler step is not the slow one

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor
                 ) -> torch.Tensor:
        with attention_backend(self.settings.attention), torch.inference_mode():
            return self._call(x, timesteps, context, y)


def optimize_unet(unet: nn.Module, settings: UNetOptimizations,
                  example_inputs: tuple[torch.Tensor, ...] | None = None) -> OptimizedStep:
    """Apply `settings` to `unet` (in place) and return the step callable; see the module docstring."""
    return OptimizedStep(unet, settings, example_inputs)
