"""The SDXL KL autoencoder: pixels <-> raw (unscaled) latents.

Architecture of sgm `modules/diffusionmodules/model.py` (`Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`) and
`models/autoencoder.py` (`AutoencodingEngine` with a `DiagonalGaussianRegularizer`), with the parameter names of
the original checkpoint layout, so the single-file `first_stage_model.*` tensors load with only the prefix stripped.

The latent scale factor (`VAEConfig.scale_factor`, 0.13025) is deliberately NOT applied here: like ComfyUI's
LATENT, `encode` returns and `decode` takes raw VAE latents; the sampler multiplies on the way in and divides on
the way out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from ..operations import use_operations

# sgm `Normalize`: GroupNorm(32, eps=1e-6, affine) in every block of the autoencoder.
_NORM_EPS = 1e-6
# sgm `DiagonalGaussianDistribution` clamps the log-variance to keep exp() finite.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0
# Nearest-neighbour upsampling indexes with 32-bit integers on some backends; stay below that many output elements.
_MAX_INTERPOLATE_ELEMENTS = 2**31 - 1


def _factory(dtype: torch.dtype | None, device: torch.device | str | None) -> dict:
    return {"dtype": dtype, "device": device}


def _group_norm(channels: int, groups: int, factory: dict) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS, affine=True, **factory)


class ResnetBlock(nn.Module):
    """sgm `ResnetBlock` without a time embedding: GN-swish-conv twice plus a (1x1 `nin_shortcut`) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups, factory)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, **factory)
        self.norm2 = _group_norm(out_channels, groups, factory)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, **factory)
        # sgm names the 1x1 skip projection `nin_shortcut`; it exists only when the width changes.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1, **factory)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # swish in place on GroupNorm's fresh output: one full-resolution activation fewer at the decoder's peak.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # dropout is 0 in every SDXL config
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """sgm `AttnBlock`: single-head self-attention over all positions, scale 1/sqrt(C), 1x1-conv projections."""

    def __init__(self, channels: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.norm = _group_norm(channels, groups, factory)
        # 1x1 convolutions rather than Linear layers: the checkpoint stores these weights as [C, C, 1, 1].
        self.q = nn.Conv2d(channels, channels, 1, **factory)
        self.k = nn.Conv2d(channels, channels, 1, **factory)
        self.v = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_out = nn.Conv2d(channels, channels, 1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hidden = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1 head, H*W, C]
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        # SDPA's default scale is 1/sqrt(last dim) = 1/sqrt(C), the single head's width, as in sgm.
        out = F.scaled_dot_product_attention(tokens(self.q(hidden)), tokens(self.k(hidden)), tokens(self.v(hidden)))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """sgm `Downsample(with_conv=True)`: asymmetric pad (right, bottom) then a stride-2 3x3 conv without padding."""

    def __init__(self, channels: int, factory: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


def _upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """Nearest x2 upsampling, split over the batch when the output would overflow 32-bit indexing."""
    per_sample = x[0].numel() * 4
    if x.numel() * 4 <= _MAX_INTERPOLATE_ELEMENTS or x.shape[0] == 1 or per_sample > _MAX_INTERPOLATE_ELEMENTS:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    chunk = max(1, _MAX_INTERPOLATE_ELEMENTS // per_sample)
    return torch.cat([F.interpolate(part, scale_factor=2.0, mode="nearest") for part in x.split(chunk)])


class Upsample(nn.Module):
    """sgm `Upsample(with_conv=True)`: nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int, factory: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_upsample_nearest(x))


class MidBlock(nn.Module):
    """The bottleneck of both halves: ResnetBlock, AttnBlock, ResnetBlock (sgm `mid.block_1/attn_1/block_2`)."""

    def __init__(self, channels: int, groups: int, factory: dict) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, factory)
        self.attn_1 = AttnBlock(channels, groups, factory)
        self.block_2 = ResnetBlock(channels, channels, groups, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: `block.j` res blocks, then `downsample` except at the last level.

    A container only: `Encoder.forward` runs the blocks itself so that no caller frame keeps a level's input alive
    while the level runs (that input is the largest tensor of the level).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, groups: int,
                 factory: dict) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups, factory) for j in range(num_blocks))
        self.downsample = Downsample(out_channels, factory) if downsample else None


class DecoderLevel(nn.Module):
    """One resolution of the decoder: `block.j` res blocks, then `upsample` except at level 0 (full resolution).

    A container only, for the same reason as `EncoderLevel`: at full resolution the level input is 2x the width.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, groups: int,
                 factory: dict) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], groups, factory) for j in range(num_blocks))
        self.upsample = Upsample(out_channels, factory) if upsample else None


class Encoder(nn.Module):
    """sgm `Encoder(double_z=True)`: image -> [mean | logvar] moments (before `quant_conv`)."""

    def __init__(self, config: VAEConfig, factory: dict) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        last = len(widths) - 1
        groups = config.norm_groups
        self.conv_in = nn.Conv2d(config.image_channels, config.base_channels, 3, padding=1, **factory)
        self.down = nn.ModuleList(
            EncoderLevel(widths[i - 1] if i else config.base_channels, widths[i], config.num_res_blocks,
                         downsample=i != last, groups=groups, factory=factory)
            for i in range(len(widths)))
        self.mid = MidBlock(widths[-1], groups, factory)
        self.norm_out = _group_norm(widths[-1], groups, factory)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1, **factory)

    def downsampling(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution-only part: image -> features at latent resolution (local, so it can be tiled)."""
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        return h

    def bottleneck(self, h: torch.Tensor) -> torch.Tensor:
        """The mid block (global attention) and the output head, at latent resolution."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h)), inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.downsampling(x))


class Decoder(nn.Module):
    """sgm `Decoder`: latent (after `post_quant_conv`) -> image. `up.k` is level k, run from the deepest (k=last)."""

    def __init__(self, config: VAEConfig, factory: dict) -> None:
        super().__init__()
        widths = [config.base_channels * m for m in config.channel_mult]
        groups = config.norm_groups
        blocks = config.num_res_blocks + 1
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1, **factory)
        self.mid = MidBlock(widths[-1], groups, factory)
        # Level k takes the width of level k+1 (or of the mid block at the deepest level) and upsamples unless k=0.
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(k + 1, len(widths) - 1)], widths[k], blocks, upsample=k != 0, groups=groups,
                         factory=factory)
            for k in range(len(widths)))
        self.norm_out = _group_norm(widths[0], groups, factory)
        self.conv_out = nn.Conv2d(widths[0], config.image_channels, 3, padding=1, **factory)

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block (global attention), at latent resolution."""
        return self.mid(self.conv_in(z))

    def upsampling(self, h: torch.Tensor) -> torch.Tensor:
        """The convolution-only part: features at latent resolution -> image (local, so it can be tiled)."""
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsampling(self.bottleneck(z))


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Draw z = mean + exp(logvar / 2) * eps from sgm's `DiagonalGaussianDistribution`.

    eps is drawn in float32 on the generator's device (the CPU global generator when none is given), then moved and
    cast, as sgm and ComfyUI do (`torch.randn(shape).to(device)`), so a seed gives the same latent on any device
    and in any working dtype.
    """
    logvar = logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)
    noise_device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
    return mean + torch.exp(0.5 * logvar) * eps.to(device=mean.device, dtype=mean.dtype)


class AutoencoderKL(nn.Module):
    """The SDXL KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with LDMs").

    State-dict keys are the single-file checkpoint's `first_stage_model.*` keys without that prefix. Build with
    `device="meta"` when weights are about to be loaded: nothing is allocated or initialised then. Inputs are
    cast to the module's parameter dtype and device; outputs come back in that dtype.
    """

    def __init__(self, config: VAEConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, *, operations=None,
                 compute_dtype: torch.dtype | None = None) -> None:
        """`operations`: the layer classes (default torch.nn; sdxl_core/operations.py), `compute_dtype`:
        what it computes in when that differs from the weights' `dtype` (manual casting)."""
        super().__init__()
        if config.base_channels % config.norm_groups:
            raise ValueError(f"base_channels ({config.base_channels}) must be a multiple of norm_groups "
                             f"({config.norm_groups}) for GroupNorm")
        self.config = config
        factory = _factory(dtype, device)
        self.encoder = Encoder(config, factory)
        self.decoder = Decoder(config, factory)
        z = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1, **factory)
        self.post_quant_conv = nn.Conv2d(z, z, 1, **factory)
        use_operations(self, operations, compute_dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in (inputs are cast to it): its weights' unless they are stored apart from it."""
        return self.compute_dtype or self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def _check(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a [B, {channels}, H, W] tensor, got {found}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if self.device.type == "meta":
            raise RuntimeError("this VAE was built on the meta device and has no weights yet: load a state dict "
                               "into it (load_state_dict(..., assign=True)) before encoding or decoding")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"{what} height and width must be multiples of {multiple}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}; crop or pad the image first")
        return x.to(device=self.device, dtype=self.dtype)

    # The two halves of each direction: the full-resolution, convolution-only part (local: tiled processing may cut
    # it into tiles) and the latent-resolution part holding the mid block's global attention (run whole).

    def encode_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> encoder features [B, C, H/8, W/8] before the mid block."""
        return self.encoder.downsampling(
            self._check(images, self.config.image_channels, "images", self.config.downscale))

    def moments_from_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features -> posterior parameters (mean, logvar), each [B, z, H/8, W/8]."""
        mean, logvar = self.quant_conv(self.encoder.bottleneck(features)).chunk(2, dim=1)
        return mean, logvar

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, z, h, w] -> decoder features [B, C, h, w] after the mid block."""
        z = self._check(latents, self.config.latent_channels, "latents", 1)
        return self.decoder.bottleneck(self.post_quant_conv(z))

    def images_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Decoder features [B, C, h, w] -> images [B, 3, 8h, 8w]."""
        return self.decoder.upsampling(features)

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mean, logvar), each [B, z, H/8, W/8], for images [B, 3, H, W] in [-1, 1]."""
        return self.moments_from_features(self.encode_features(images))

    def encode(self, images: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Raw (unscaled) latents: a posterior sample by default (sgm, ComfyUI, diffusers), the mean if not `sample`."""
        mean, logvar = self.encode_moments(images)
        return sample_posterior(mean, logvar, generator) if sample else mean

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, 8h, 8w], nominally in [-1, 1] but NOT clamped: clamping is the caller's choice."""
        return self.images_from_features(self.decode_features(latents))
