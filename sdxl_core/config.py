"""Architecture facts of SDXL, declared once (numbers from sgm `configs/inference/sd_xl_{base,refiner}.yaml`).

Every model in the core is built from one of these frozen dataclasses. The full-size presets mirror the published
checkpoints; the tiny presets keep the same topology (levels without attention, per-level transformer depths, the
2816/2560 ADM widths) at a size that runs on a laptop CPU in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Width of each Fourier-embedded micro-conditioning scalar (sgm `ConcatTimestepEmbedderND(outdim=256)`).
ADM_SCALAR_EMBED_DIM = 256
# Latent scale between VAE latents and the diffusion model's space (ComfyUI `latent_formats.SDXL`).
SDXL_LATENT_SCALE = 0.13025
# Pixels per latent cell.
VAE_DOWNSCALE = 8
# CLIP context length: BOS + 75 tokens + EOS.
CLIP_CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class UNetConfig:
    """The SDXL UNet (sgm `openaimodel.UNetModel` with linear transformer projections)."""

    model_channels: int  # width of level 0; time embedding is 4x this
    channel_mult: tuple[int, ...]  # width multiplier per level; len = number of levels
    transformer_depth: tuple[int, ...]  # transformer blocks per spatial transformer, per level; 0 = no attention
    transformer_depth_middle: int  # transformer blocks in the middle block's spatial transformer
    context_dim: int  # cross-attention context width (2048 base = CLIP-L 768 + bigG 1280; 1280 refiner)
    adm_in_channels: int  # width of the "y" vector: pooled bigG + Fourier-embedded micro-conditioning
    num_head_channels: int = 64  # attention heads = level width // this
    num_res_blocks: int = 2  # res blocks per level on the way down (one more on the way up)
    in_channels: int = 4
    out_channels: int = 4
    norm_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"transformer_depth has {len(self.transformer_depth)} entries, channel_mult {len(self.channel_mult)};"
                " one per level is expected"
            )

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)


@dataclass(frozen=True)
class VAEConfig:
    """The SDXL KL autoencoder (sgm `diffusionmodules/model.py` Encoder/Decoder, `AutoencoderKL`)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder uses one more per level
    latent_channels: int = 4
    image_channels: int = 3
    norm_groups: int = 32
    scale_factor: float = SDXL_LATENT_SCALE

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer, as transformers' `CLIPTextConfig` needs it."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str  # "quick_gelu" for CLIP-L, exact "gelu" for OpenCLIP bigG
    projection_dim: int | None = None  # bigG projects the pooled EOS state; CLIP-L's pooled output is unused
    vocab_size: int = 49408
    max_position_embeddings: int = CLIP_CONTEXT_LENGTH
    layer_norm_eps: float = 1e-5
    # Hidden state used as context: -2 = the input of the last layer (penultimate), without the final LayerNorm.
    context_layer: int = -2


# The two SDXL stages: the base (full schedule, two text encoders) and the latent refiner (low-noise end, bigG).
STAGES = ("base", "refiner")


class WrongStageError(ValueError):
    """A model of one SDXL stage was given where the other stage belongs."""


def require_stage(model, kind: str, action: str) -> None:
    """Refuse, in a sentence, anything but an SDXL model of stage `kind` for `action` (e.g. "SDXL Base Sampler")."""
    found = getattr(model, "kind", None)
    if found not in STAGES:
        raise WrongStageError(f"{action} needs an SDXL {kind} model (from the SDXL checkpoint loader or "
                              f"sdxl_core.load_checkpoint), got {type(model).__name__}")
    if found != kind:
        raise WrongStageError(f"{action} needs the SDXL {kind} checkpoint, but the model given is the SDXL {found} "
                              f"(from {getattr(model, 'source', None) or 'memory'}); load the {kind} checkpoint "
                              f"(e.g. sd_xl_{kind}_1.0.safetensors) and use it there")


# What the UNet's output means (ComfyUI `model_sampling` EPS / V_PREDICTION; k-diffusion's Discrete*DDPMDenoiser):
# "eps", the noise (SDXL 1.0 and most fine-tunes); "v_prediction", v = alpha eps - sigma x0 (Salimans & Ho 2022;
# NoobAI-XL and the Illustrious v-pred lines).
PREDICTION_TYPES = ("eps", "v_prediction")


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The discrete DDPM training schedule: `num_timesteps` betas spaced linearly in sqrt(beta) from `linear_start`
    to `linear_end` (sgm `LegacyDDPMDiscretization`, ComfyUI `ModelSamplingDiscrete` with "linear" betas)."""

    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    # Zero terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the
    # schedule rescaled so its last step is (almost) pure noise, as ComfyUI's ModelSamplingDiscrete(zsnr=True).
    zsnr: bool = False

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {self.num_timesteps}")
        if not 0.0 < self.linear_start < self.linear_end < 1.0:
            raise ValueError(f"expected 0 < linear_start < linear_end < 1, got {self.linear_start} and "
                             f"{self.linear_end}")


SDXL_NOISE_SCHEDULE = NoiseScheduleConfig()


@dataclass(frozen=True)
class SDXLConfig:
    """One SDXL stage: its UNet, VAE and text encoders. `clip_l` is None for the refiner."""

    kind: str  # "base" or "refiner"
    unet: UNetConfig
    vae: VAEConfig
    clip_g: TextEncoderConfig
    clip_l: TextEncoderConfig | None = None
    adm_scalars: tuple[str, ...] = field(default=())  # micro-conditioning fields in ADM order
    prediction: str = "eps"  # one of PREDICTION_TYPES
    noise_schedule: NoiseScheduleConfig = SDXL_NOISE_SCHEDULE  # base and refiner share SDXL's

    def __post_init__(self) -> None:
        if self.kind not in STAGES:
            raise ValueError(f"kind must be one of {STAGES}, got {self.kind!r}")
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {self.prediction!r}")
        context = self.clip_g.hidden_size + (self.clip_l.hidden_size if self.clip_l else 0)
        if context != self.unet.context_dim:
            raise ValueError(f"text encoders give a {context}-wide context, the UNet expects {self.unet.context_dim}")
        pooled = self.clip_g.projection_dim or self.clip_g.hidden_size
        adm = pooled + ADM_SCALAR_EMBED_DIM * len(self.adm_scalars)
        if adm != self.unet.adm_in_channels:
            raise ValueError(f"pooled + micro-conditioning give {adm} ADM channels, the UNet expects "
                             f"{self.unet.adm_in_channels}")


# ADM layout (sgm GeneralConditioner order; ComfyUI `SDXL.encode_adm`, diffusers `_get_add_time_ids`).
BASE_ADM_SCALARS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
REFINER_ADM_SCALARS = ("original_height", "original_width", "crop_top", "crop_left", "aesthetic_score")

CLIP_L = TextEncoderConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                           hidden_act="quick_gelu")
CLIP_BIG_G = TextEncoderConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120,
                               hidden_act="gelu", projection_dim=1280)
SDXL_VAE = VAEConfig()

SDXL_BASE_UNET = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10),
                            transformer_depth_middle=10, context_dim=2048, adm_in_channels=2816)
SDXL_REFINER_UNET = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                               transformer_depth_middle=4, context_dim=1280, adm_in_channels=2560)

SDXL_BASE = SDXLConfig(kind="base", unet=SDXL_BASE_UNET, vae=SDXL_VAE, clip_g=CLIP_BIG_G, clip_l=CLIP_L,
                       adm_scalars=BASE_ADM_SCALARS)
SDXL_REFINER = SDXLConfig(kind="refiner", unet=SDXL_REFINER_UNET, vae=SDXL_VAE, clip_g=CLIP_BIG_G,
                          adm_scalars=REFINER_ADM_SCALARS)

# Tiny presets: same topology, sized for CPU tests. The pooled width stays 1280 so the ADM stays 2816 / 2560.
TINY_CLIP_L = TextEncoderConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                                hidden_act="quick_gelu")
TINY_CLIP_G = TextEncoderConfig(hidden_size=64, num_layers=3, num_heads=2, intermediate_size=128,
                                hidden_act="gelu", projection_dim=1280)
TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1)
TINY_BASE_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2),
                            transformer_depth_middle=2, context_dim=96, adm_in_channels=2816, num_head_channels=16)
TINY_REFINER_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0),
                               transformer_depth_middle=1, context_dim=64, adm_in_channels=2560, num_head_channels=16)
TINY_BASE = SDXLConfig(kind="base", unet=TINY_BASE_UNET, vae=TINY_VAE, clip_g=TINY_CLIP_G, clip_l=TINY_CLIP_L,
                       adm_scalars=BASE_ADM_SCALARS)
TINY_REFINER = SDXLConfig(kind="refiner", unet=TINY_REFINER_UNET, vae=TINY_VAE, clip_g=TINY_CLIP_G,
                          adm_scalars=REFINER_ADM_SCALARS)


@dataclass(frozen=True)
class ControlNetConfig:
    """An SDXL ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder half plus a hint encoder
    (sgm/ComfyUI `cldm.ControlNet`, diffusers `ControlNetModel`)."""

    unet: UNetConfig  # the copied encoder: widths, depths, context and ADM; its out_channels are not used
    hint_channels: int = 3  # RGB control image
    # Widths of the hint encoder's stages; each step to the next halves the resolution, so 4 stages give the
    # VAE's 8x (the published value in sgm's cldm.py and diffusers' `conditioning_embedding_out_channels`).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def hint_downscale(self) -> int:
        return 2 ** (len(self.hint_block_channels) - 1)


SDXL_CONTROLNET = ControlNetConfig(unet=SDXL_BASE_UNET)
TINY_CONTROLNET = ControlNetConfig(unet=TINY_BASE_UNET)
