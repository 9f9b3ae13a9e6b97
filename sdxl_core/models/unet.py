"""The SDXL UNet (base and refiner), parameter-compatible with the original single-file checkpoints.

Module and parameter names follow sgm `diffusionmodules/openaimodel.py` exactly, so the checkpoint's
`model.diffusion_model.*` tensors load with only that prefix stripped. Every width, depth and head count comes
from `UNetConfig`; the same code builds the 3-level base and the 4-level refiner.

Loading without initialising: build on the meta device, then assign the checkpoint tensors::

    unet = UNetModel(config, device="meta")
    unet.load_state_dict(state_dict, strict=True, assign=True)   # tensors already in the wanted dtype/device

`UNetModel.from_state_dict` does exactly that (plus the dtype/device cast). With `assign=True` the module takes
the given tensors as its parameters (no copy), so their dtype and device become the model's.

Numerical choices (docs/architecture.md#numerical-choices):
- GroupNorm runs in the model dtype, as diffusers and ComfyUI do, not upcast to fp32 as sgm's `GroupNorm32` does.
  PyTorch's GroupNorm kernels already accumulate mean and variance in fp32 for fp16/bf16 inputs (CPU and CUDA), so
  the upcast only changes the rounding of the affine output while costing two extra full-size copies per norm
  (about 60 norms per step). In fp32 the two choices are the same computation, hence exact diffusers parity.
- The sinusoidal time embedding is computed in fp32 and cast to the model dtype only at the first Linear.
- Attention uses `scaled_dot_product_attention` in the model dtype (SDXL needs no attention upcast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..operations import use_operations
from .timestep_embedding import timestep_embedding

# Normalisation epsilons of sgm (docs/architecture.md#numerical-choices): ResBlocks and the output head, spatial
# transformers, LayerNorms.
# All norms run in the model dtype; see the module docstring for why sgm's fp32 GroupNorm upcast is not copied.
RESBLOCK_GROUP_NORM_EPS = 1e-5
TRANSFORMER_GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
# GEGLU feed-forward: hidden width = FF_MULT * model width (sgm `FeedForward(mult=4, glu=True)`).
FF_MULT = 4


class ResBlock(nn.Module):
    """Residual block with an additive time-embedding bias (sgm `openaimodel.ResBlock`, no scale-shift norm)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, norm_groups: int, **factory):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, in_channels, eps=RESBLOCK_GROUP_NORM_EPS, **factory),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, **factory),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **factory))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels, eps=RESBLOCK_GROUP_NORM_EPS, **factory),
            nn.SiLU(),
            nn.Identity(),  # sgm's (inference-time no-op) dropout; kept so the conv stays at checkpoint index 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **factory),
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1, **factory)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head (cross-)attention without q/k/v biases (sgm `attention.CrossAttention`, SDPA backend).

    q, k and v stay separate Linear layers (checkpoint names); fusing them for speed is a load-time transform.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, **factory):
        super().__init__()
        self.heads = heads
        inner_dim = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False, **factory)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False, **factory)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False, **factory)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim, **factory))  # sgm: to_out = [Linear, Dropout]

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        # Default scale 1/sqrt(head_dim) is sgm's `dim_head ** -0.5`.
        out = F.scaled_dot_product_attention(q, k, v)
        batch, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class GEGLU(nn.Module):
    """Gated GELU projection with exact (erf) GELU (Shazeer 2020, "GLU Variants"; sgm `attention.GEGLU`)."""

    def __init__(self, dim_in: int, dim_out: int, **factory):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP of the transformer block (sgm `attention.FeedForward(glu=True)`)."""

    def __init__(self, dim: int, **factory):
        super().__init__()
        hidden = FF_MULT * dim
        # Index 1 is sgm's dropout; the identity keeps the output Linear at checkpoint index 2.
        self.net = nn.Sequential(GEGLU(dim, hidden, **factory), nn.Identity(), nn.Linear(hidden, dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU MLP (sgm `attention.BasicTransformerBlock`)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, **factory):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim, **factory)
        self.ff = FeedForward(dim, **factory)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, **factory)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **factory)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS, **factory)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-token transformer with linear in/out projections (sgm `attention.SpatialTransformer`, use_linear)."""

    def __init__(self, channels: int, depth: int, context_dim: int, head_channels: int, norm_groups: int, **factory):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {head_channels} channels")
        heads = channels // head_channels
        self.norm = nn.GroupNorm(norm_groups, channels, eps=TRANSFORMER_GROUP_NORM_EPS, **factory)
        self.proj_in = nn.Linear(channels, channels, **factory)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, context_dim, heads, head_channels, **factory) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels, **factory)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C] tokens
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W, rounding up (sgm `openaimodel.Downsample`, conv variant)."""

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling + 3x3 conv (sgm `openaimodel.Upsample`).

    The target size is the matching skip tensor's, not simply 2x, so latents whose sides are not multiples of
    2**(levels-1) work (as ComfyUI's `output_shape` and diffusers' `upsample_size` do; sgm would fail).
    """

    def __init__(self, channels: int, **factory):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: layers applied in order, each given what it needs.

    Plays the role of sgm's `TimestepEmbedSequential`; the list indices are the checkpoint's (`.0`, `.1`, `.2`).
    """

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                upsample_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                if upsample_size is None:
                    raise RuntimeError("an output block with an Upsample needs the size of the next skip tensor")
                h = layer(h, upsample_size)
            else:
                h = layer(h)
        return h


def _mlp(in_dim: int, out_dim: int, **factory) -> nn.Sequential:
    """Linear-SiLU-Linear embedding MLP; indices 0 and 2 are the checkpoint's (sgm `time_embed`, `label_emb.0`)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, **factory), nn.SiLU(), nn.Linear(out_dim, out_dim, **factory))


@dataclass(frozen=True)
class ControlResiduals:
    """Additions to the UNet's activations from a ControlNet or an adapter, in the original (sgm) layout.

    Indices are input-block indices (0 = the input convolution), in forward order:
    - `skips[i]` is added to input block i's output where the up path takes it as a skip connection (a ControlNet's
      zero-convolution outputs: ComfyUI's `control["output"]`, diffusers' `down_block_additional_residuals`);
    - `middle` is added to the middle block's output (`control["middle"]`, `mid_block_additional_residual`);
    - `inputs[i]` is added to input block i's output before it flows on (T2I adapters: `control["input"]`).
    An empty tuple or a None entry adds nothing there. ComfyUI pops its lists from the end; these are in order.
    """

    skips: tuple[torch.Tensor | None, ...] = ()
    middle: torch.Tensor | None = None
    inputs: tuple[torch.Tensor | None, ...] = ()

    def check_for(self, num_input_blocks: int) -> None:
        for name, values in (("skips", self.skips), ("inputs", self.inputs)):
            if values and len(values) != num_input_blocks:
                raise ValueError(f"control residuals {name!r} has {len(values)} entries but the UNet has "
                                 f"{num_input_blocks} input blocks; a ControlNet made for another UNet layout?")

    def scaled(self, factor: float) -> ControlResiduals:
        """Every residual times `factor` (a ControlNet's strength)."""
        def times(t):
            return None if t is None else t * factor
        return ControlResiduals(tuple(times(t) for t in self.skips), times(self.middle),
                                tuple(times(t) for t in self.inputs))

    @staticmethod
    def summed(parts: Sequence[ControlResiduals]) -> ControlResiduals:
        """Several ControlNets' residuals added place by place (ComfyUI `control_merge` over a chain)."""
        def add(values):
            present = [v for v in values if v is not None]
            if not present:
                return None
            total = present[0]
            for value in present[1:]:
                total = total + value
            return total

        def add_lists(lists):
            lists = [values for values in lists if values]
            if not lists:
                return ()
            if len({len(values) for values in lists}) > 1:
                raise ValueError(f"cannot add control residuals of {sorted({len(v) for v in lists})} entries")
            return tuple(add(column) for column in zip(*lists))

        return ControlResiduals(add_lists([p.skips for p in parts]), add([p.middle for p in parts]),
                                add_lists([p.inputs for p in parts]))


def _add_residual(h: torch.Tensor, residual: torch.Tensor | None, where: tuple[str, int]) -> torch.Tensor:
    """h + residual, kept in h's dtype (ComfyUI adds in place, so the sum is rounded to the activation's dtype)."""
    if residual is None:
        return h
    if residual.shape[1:] != h.shape[1:] or residual.shape[0] not in (1, h.shape[0]):
        raise ValueError(f"a control residual of shape {tuple(residual.shape)} cannot be added at the {where[0]} "
                         f"{where[1]}, whose activation is {tuple(h.shape)}; the ControlNet does not fit this UNet "
                         "or this latent size")
    return (h + residual).to(h.dtype)


def build_encoder(config: UNetConfig, **factory) -> tuple[nn.Sequential, nn.Sequential, nn.ModuleList, UNetBlock,
                                                          list[int]]:
    """The UNet's embeddings, down path and middle block, which a ControlNet copies module for module.

    Returns (time_embed, label_emb, input_blocks, middle_block, skip_channels), where `skip_channels` is the
    width of every input block's output, in order.
    """
    groups = config.norm_groups
    emb_dim = config.time_embed_dim

    def res(cin: int, cout: int) -> ResBlock:
        return ResBlock(cin, cout, emb_dim, groups, **factory)

    def attn(ch: int, depth: int) -> SpatialTransformer:
        return SpatialTransformer(ch, depth, config.context_dim, config.num_head_channels, groups, **factory)

    time_embed = _mlp(config.model_channels, emb_dim, **factory)
    label_emb = nn.Sequential(_mlp(config.adm_in_channels, emb_dim, **factory))
    input_blocks = nn.ModuleList([
        UNetBlock([nn.Conv2d(config.in_channels, config.model_channels, 3, padding=1, **factory)])
    ])
    skip_channels = [config.model_channels]
    ch = config.model_channels
    for level, (level_ch, depth) in enumerate(zip(config.level_channels, config.transformer_depth)):
        for _ in range(config.num_res_blocks):
            layers = [res(ch, level_ch)]
            ch = level_ch
            if depth:
                layers.append(attn(ch, depth))
            input_blocks.append(UNetBlock(layers))
            skip_channels.append(ch)
        if level != config.num_levels - 1:
            input_blocks.append(UNetBlock([Downsample(ch, **factory)]))
            skip_channels.append(ch)
    middle_block = UNetBlock([res(ch, ch), attn(ch, config.transformer_depth_middle), res(ch, ch)])
    return time_embed, label_emb, input_blocks, middle_block, skip_channels


class UNetModel(nn.Module):
    """SDXL eps-prediction UNet (Podell et al. 2023; sgm `openaimodel.UNetModel` with `num_classes="sequential"`)."""

    def __init__(self, config: UNetConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, operations=None,
                 compute_dtype: torch.dtype | None = None):
        """`operations`: the layer classes (default torch.nn; see sdxl_core/operations.py), `compute_dtype`:
        what it computes in when that differs from the weights' `dtype` (manual casting)."""
        super().__init__()
        self.config = config
        factory = {"dtype": dtype, "device": device}
        groups = config.norm_groups
        emb_dim = config.time_embed_dim
        levels = config.level_channels

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, groups, **factory)

        def attn(ch: int, depth: int) -> SpatialTransformer:
            return SpatialTransformer(ch, depth, config.context_dim, config.num_head_channels, groups, **factory)

        self.time_embed, self.label_emb, self.input_blocks, self.middle_block, skip_channels = \
            build_encoder(config, **factory)
        ch = skip_channels[-1]

        # Up path: one more block per level than on the way down, each eating one skip tensor.
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(config.num_levels)):
            level_ch, depth = levels[level], config.transformer_depth[level]
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), level_ch)]
                ch = level_ch
                if depth:
                    layers.append(attn(ch, depth))
                if level != 0 and i == config.num_res_blocks:
                    layers.append(Upsample(ch, **factory))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=RESBLOCK_GROUP_NORM_EPS, **factory),
            nn.SiLU(),
            nn.Conv2d(ch, config.out_channels, 3, padding=1, **factory),
        )
        use_operations(self, operations, compute_dtype)

    @classmethod
    def from_state_dict(cls, config: UNetConfig, state_dict: Mapping[str, torch.Tensor],
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> UNetModel:
        """Build on the meta device and adopt the (prefix-stripped) checkpoint tensors without initialising.

        Tensors are cast to `dtype` / moved to `device` when given, otherwise used as they are (no copy). Loading is
        strict: missing, unexpected or mis-shaped keys raise with the offending names.
        """
        model = cls(config, device="meta")
        tensors = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                   for name, t in state_dict.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
        return model

    def _check_inputs(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                      y: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be [B, {cfg.in_channels}, h, w] latents, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be [B] = [{batch}], got shape {tuple(timesteps.shape)}")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be [B={batch}, T, {cfg.context_dim}], got shape {tuple(context.shape)}")
        if y.shape != (batch, cfg.adm_in_channels):
            raise ValueError(f"y (pooled text + micro-conditioning) must be [B={batch}, {cfg.adm_in_channels}], "
                             f"got shape {tuple(y.shape)}")

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor, control: ControlResiduals | None = None) -> torch.Tensor:
        """Predict the noise eps of latents `x` at `timesteps` (0..999, float or int) given text `context` and ADM `y`.

        `control` adds ControlNet (or adapter) residuals where sgm's `ControlledUnetModel` and ComfyUI's
        `apply_control` add them; without it the forward pass is the plain UNet's, with no extra work.
        Inputs are cast to the model's dtype; eps is returned in `x`'s dtype.
        """
        if self.out[2].weight.is_meta:
            raise RuntimeError("the UNet was built on the meta device and has no weights yet: load a checkpoint with "
                               "load_state_dict(..., assign=True) or UNetModel.from_state_dict first")
        self._check_inputs(x, timesteps, context, y)
        dtype = self.compute_dtype or self.out[2].weight.dtype
        context = context.to(dtype)

        # Timesteps are often built on the CPU from a sigma schedule; the embedding is computed where x lives.
        t_emb = timestep_embedding(timesteps.to(x.device), self.config.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(dtype))

        # Down: every block's output is a skip tensor for the matching up block (last in, first out).
        if control is not None:
            control.check_for(len(self.input_blocks))
        h = x.to(dtype)
        skips: list[torch.Tensor] = []
        for index, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if control is not None:
                h = _add_residual(h, control.inputs[index] if control.inputs else None, ("input block", index))
            skips.append(h)

        h = self.middle_block(h, emb, context)
        if control is not None:
            h = _add_residual(h, control.middle, ("middle block", 0))

        # Up: concatenate the matching skip; a level's last block upsamples to the next skip tensor's size.
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None and control.skips:
                skip = _add_residual(skip, control.skips[len(skips)], ("skip of input block", len(skips)))
            next_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(torch.cat([h, skip], dim=1), emb, context, upsample_size=next_size)

        return self.out(h).to(x.dtype)
