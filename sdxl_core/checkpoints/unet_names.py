"""The one table between the original (sgm/ldm) UNet names and diffusers' UNet2DConditionModel names.

Our UNet keeps sgm's layout: `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`, counted straight through
the levels, with each block a Sequential whose slot M holds the ResBlock (0), the SpatialTransformer (1, on levels
with attention) or the resampler. diffusers groups the same modules per level: `down_blocks.i.resnets.j` /
`attentions.j` / `downsamplers.0`, `mid_block`, and `up_blocks.i` (deepest level first, one more layer per level
than on the way down). The correspondence follows from three facts of the `UNetConfig` (the number of levels, res
blocks per level, which levels have attention), so the table is built from them instead of written out; it is the
one diffusers' single-file converter (`convert_ldm_unet_checkpoint`) and ComfyUI's `unet_to_diffusers` encode
(docs/checkpoints.md#diffusers-folders). The diffusers-folder reader (`diffusers_layout`) reads diffusers names
through it and the LoRA matcher (`lora`) names our layers with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import UNetConfig

# Inside a ResBlock: diffusers' ResnetBlock2D layer -> sgm's Sequential index. Attention blocks need no renaming:
# diffusers' Transformer2DModel (with linear projections) uses sgm's SpatialTransformer names.
_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Modules outside the levels: ours -> diffusers'.
_OUTSIDE_LEVELS = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                   "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
                   "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}


class UNetNameTable:
    """Our (sgm) UNet module and parameter names <-> diffusers' names, for one UNet topology.

    `num_res_blocks` res blocks per level on the way down and `has_attention[level]` for each level, from the
    shallowest (full resolution) to the deepest. A name is translated by its block (the longest known prefix), so
    module paths (`input_blocks.4.1.proj_in`) and parameter keys (`input_blocks.4.1.proj_in.weight`) both work."""

    def __init__(self, num_res_blocks: int, has_attention: Sequence[bool]):
        if num_res_blocks < 1 or not has_attention:
            raise ValueError(f"a UNet has at least one level and one res block per level, got {num_res_blocks} "
                             f"res blocks and {len(has_attention)} levels")
        self.num_res_blocks = num_res_blocks
        self.has_attention = tuple(bool(a) for a in has_attention)
        # block prefix -> (the other side's prefix, is a ResBlock), one dict per direction
        self._to_diffusers: dict[str, tuple[str, bool]] = {}
        self._to_ldm: dict[str, tuple[str, bool]] = {}
        for ours, theirs in _OUTSIDE_LEVELS.items():
            self._pair(ours, theirs, is_resnet=False)
        self._pair_levels()

    @classmethod
    def for_config(cls, config: UNetConfig) -> UNetNameTable:
        return cls(config.num_res_blocks, [depth > 0 for depth in config.transformer_depth])

    def _pair(self, ours: str, theirs: str, *, is_resnet: bool) -> None:
        self._to_diffusers[ours] = (theirs, is_resnet)
        self._to_ldm[theirs] = (ours, is_resnet)

    def _pair_levels(self) -> None:
        levels = len(self.has_attention)
        down_per_level = self.num_res_blocks + 1  # the res blocks, then the downsampler (or nothing, deepest level)
        for level, attention in enumerate(self.has_attention):
            for j in range(self.num_res_blocks):
                ours = f"input_blocks.{1 + level * down_per_level + j}"
                self._pair(f"{ours}.0", f"down_blocks.{level}.resnets.{j}", is_resnet=True)
                if attention:
                    self._pair(f"{ours}.1", f"down_blocks.{level}.attentions.{j}", is_resnet=False)
            if level != levels - 1:
                self._pair(f"input_blocks.{(level + 1) * down_per_level}.0.op",
                           f"down_blocks.{level}.downsamplers.0.conv", is_resnet=False)
        self._pair("middle_block.0", "mid_block.resnets.0", is_resnet=True)
        self._pair("middle_block.1", "mid_block.attentions.0", is_resnet=False)
        self._pair("middle_block.2", "mid_block.resnets.1", is_resnet=True)
        # Upward, each level has one more res block, and all but the last level end in an upsampler, which sits
        # in the last block's slot after the attention (2) or, on a level without attention, after the ResBlock (1).
        up_per_level = self.num_res_blocks + 1
        for up, level in enumerate(reversed(range(levels))):
            attention = self.has_attention[level]
            for j in range(up_per_level):
                ours = f"output_blocks.{up * up_per_level + j}"
                self._pair(f"{ours}.0", f"up_blocks.{up}.resnets.{j}", is_resnet=True)
                if attention:
                    self._pair(f"{ours}.1", f"up_blocks.{up}.attentions.{j}", is_resnet=False)
            if level != 0:
                last = f"output_blocks.{up * up_per_level + up_per_level - 1}"
                self._pair(f"{last}.{2 if attention else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv",
                           is_resnet=False)

    def to_diffusers(self, name: str) -> str | None:
        """Our name -> diffusers', or None when no block of this topology holds it."""
        return _translate(name, self._to_diffusers, {ours: theirs for theirs, ours in _RESNET_LAYERS.items()})

    def from_diffusers(self, name: str) -> str | None:
        """A diffusers name -> ours, or None when no block of this topology holds it."""
        return _translate(name, self._to_ldm, _RESNET_LAYERS)


def _translate(name: str, blocks: dict[str, tuple[str, bool]], resnet_layers: dict[str, str]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        block = ".".join(parts[:cut])
        if block not in blocks:
            continue
        other, is_resnet = blocks[block]
        inner = parts[cut:]
        if is_resnet and inner:
            inner = _renamed(inner, resnet_layers)
            if inner is None:
                return None
        return ".".join([other, *inner])
    return None


def _renamed(inner: list[str], layers: dict[str, str]) -> list[str] | None:
    """The path inside a ResBlock with its layer renamed (["in_layers", "2", "weight"] -> ["conv1", "weight"])."""
    for cut in range(len(inner), 0, -1):
        layer = layers.get(".".join(inner[:cut]))
        if layer is not None:
            return [*layer.split("."), *inner[cut:]]
    return None
