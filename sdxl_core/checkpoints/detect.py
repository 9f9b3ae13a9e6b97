"""What a checkpoint is, told from its tensor names and shapes alone (never from the file name).

`identify` names the model family and SDXL variant from probe keys, in the spirit of diffusers
`single_file_utils.CHECKPOINT_KEY_NAMES`; `infer_config` reads the full architecture (channels, levels, transformer
depths, context and ADM widths, text-encoder widths and depths) from the shapes, so full-size and tiny checkpoints go
through the same code. A few facts are not visible in any shape (attention head counts, GroupNorm group counts);
they come from optional `hints` (a checkpoint's safetensors metadata or a diffusers folder's config.json files) and
otherwise default to SDXL's values (64-wide attention heads, 32 groups).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import (
    BASE_ADM_SCALARS,
    PREDICTION_TYPES,
    REFINER_ADM_SCALARS,
    SDXL_VAE,
    NoiseScheduleConfig,
    SDXLConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from .errors import CorruptCheckpointError, StateDictMismatchError

Shapes = Mapping[str, tuple]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# CLIP-L is stored in transformers names; the prefix strip leaves `text_model.*`.
BASE_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BASE_CLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_CLIP_G_PREFIX = "conditioner.embedders.0.model."

# Metadata keys that carry what shapes cannot show (written by `save_checkpoint`, read back by `infer_config`).
HINT_UNET_HEAD_CHANNELS = "sdxl_core.unet.num_head_channels"
HINT_UNET_NORM_GROUPS = "sdxl_core.unet.norm_groups"
HINT_VAE_NORM_GROUPS = "sdxl_core.vae.norm_groups"
HINT_CLIP_L_HEADS = "sdxl_core.clip_l.num_heads"
HINT_CLIP_G_HEADS = "sdxl_core.clip_g.num_heads"
# SDXL's attention heads are 64 wide in the UNet and in both text encoders; GroupNorm uses 32 groups throughout.
DEFAULT_HEAD_WIDTH = 64
DEFAULT_NORM_GROUPS = 32


# Marker keys of SDXL-architecture models with a noise schedule these nodes do not run: the keys ComfyUI 0.3.64's
# `supported_models.SDXL.model_type` reads (`edm_mean` + `edm_std`: Playground v2.5, sampled as EDM with
# sigma_data 0.5 and a latent format of its own; `edm_vpred.sigma_max`: CosXL, v-prediction on a continuous EDM
# schedule). Either key of a pair is enough to refuse: without the other ComfyUI would sample the file as eps, which
# is no more right. Rectified-flow SDXL variants carry no key ComfyUI knows (it runs them through a ModelSamplingSD3
# node the user adds), so single files of them cannot be told apart; diffusers folders name their scheduler.
_SCHEDULE_MARKERS = (
    (("edm_mean", "edm_std"), "Playground v2.5's EDM schedule (continuous sigmas 0.002-80 with sigma_data 0.5, and "
                              "its own latent mean and scale)"),
    (("edm_vpred.sigma_max", "edm_vpred.sigma_min"), "CosXL's v-prediction on a continuous EDM schedule"),
)
# The empty marker tensors of a v-prediction checkpoint, and of one trained with zero terminal SNR (read only
# together with v_pred, as ComfyUI reads them). `save_checkpoint` writes them back.
V_PRED_MARKER = "v_pred"
ZTSNR_MARKER = "ztsnr"
PREDICTION_MARKERS = (V_PRED_MARKER, ZTSNR_MARKER)
# The same two facts from a diffusers folder's scheduler/scheduler_config.json (`prediction_type`,
# `rescale_betas_zero_snr`), carried as hints (diffusers_layout.py) since such a folder has no marker tensors.
HINT_PREDICTION = "sdxl_core.scheduler.prediction"
HINT_ZSNR = "sdxl_core.scheduler.zsnr"


def prediction_from_keys(keys, hints: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) of an SDXL checkpoint from its marker keys, as ComfyUI detects them,
    else from a diffusers folder's scheduler hints."""
    keys = set(keys)
    if V_PRED_MARKER in keys:
        return "v_prediction", ZTSNR_MARKER in keys
    hints = hints or {}
    if hints.get(HINT_PREDICTION) in PREDICTION_TYPES:
        return hints[HINT_PREDICTION], hints.get(HINT_ZSNR) == "true"
    return "eps", False


def schedule_marker(keys) -> tuple[str, str] | None:
    """(the marker key found, what it marks) when an SDXL-architecture file is trained for another schedule."""
    keys = set(keys)
    for markers, what in _SCHEDULE_MARKERS:
        for marker in markers:
            if marker in keys:
                return marker, what
    return None


@dataclass(frozen=True)
class Identification:
    """The verdict on a set of tensors: `kind` is a short tag, `description` a phrase for messages."""

    kind: str  # "sdxl-base", "sdxl-refiner", "sdxl-vae", or a foreign tag: "sd1", "sd2", "sd3", "flux", ...
    description: str

    @property
    def is_sdxl_checkpoint(self) -> bool:
        return self.kind in ("sdxl-base", "sdxl-refiner")


def _has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _unet_context_width(shapes: Shapes, prefix: str) -> int | None:
    """Cross-attention context width of an ldm-layout UNet (`attn2.to_k` is [inner, context])."""
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def top_level_summary(shapes: Shapes, limit: int = 6) -> str:
    """The most common key prefixes with their tensor counts, to show what an unknown file contains."""
    counts = Counter(".".join(key.split(".")[:2]) for key in shapes)
    parts = [f"{prefix}.* ({count})" for prefix, count in counts.most_common(limit)]
    more = len(counts) - limit
    return ", ".join(parts) + (f", and {more} more groups" if more > 0 else "") if parts else "no tensors at all"


def identify(shapes: Shapes) -> Identification:
    """Tell SDXL base / refiner / VAE apart from other model families by probe keys and shapes."""
    keys = shapes.keys()
    if any("lora_up" in k or "lora_down" in k or ".lora_A." in k or ".lora_B." in k for k in keys):
        return Identification("lora", "a LoRA (low-rank adapter), not a checkpoint")
    for prefix in ("model.diffusion_model.", ""):
        if f"{prefix}double_blocks.0.img_attn.qkv.weight" in shapes:
            return Identification("flux", "a Flux checkpoint")
        if f"{prefix}joint_blocks.0.context_block.attn.qkv.weight" in shapes:
            return Identification("sd3", "a Stable Diffusion 3 checkpoint")
    context = _unet_context_width(shapes, UNET_PREFIX)
    if _has_prefix(shapes, "cond_stage_model.transformer."):
        return Identification("sd1", f"an SD 1.x checkpoint (a CLIP ViT-L text encoder at "
                                     f"cond_stage_model.transformer, {context or 768}-wide cross-attention)")
    if _has_prefix(shapes, "cond_stage_model.model."):
        return Identification("sd2", f"an SD 2.x checkpoint (an OpenCLIP ViT-H text encoder at "
                                     f"cond_stage_model.model, {context or 1024}-wide cross-attention)")
    if _has_prefix(shapes, "embedder.") or _has_prefix(shapes, "model.diffusion_model.down_blocks.0.0.channelwise"):
        return Identification("cascade", "a Stable Cascade checkpoint")
    has_unet = f"{UNET_PREFIX}input_blocks.0.0.weight" in shapes
    is_base = has_unet and _has_prefix(shapes, BASE_CLIP_G_PREFIX + "transformer.resblocks.") and _has_prefix(
        shapes, BASE_CLIP_L_PREFIX + "text_model.")
    is_refiner = has_unet and _has_prefix(shapes, REFINER_CLIP_G_PREFIX + "transformer.resblocks.") and not \
        _has_prefix(shapes, "conditioner.embedders.1.")
    if is_base or is_refiner:
        # Fine-tunes that keep the SDXL architecture but change the noise schedule mark it with a key (the markers
        # ComfyUI's `supported_models.SDXL.model_type` reads); sampled as eps-prediction they give broken images.
        if (found := schedule_marker(keys)) is not None:
            marker, what = found
            return Identification("sdxl-other-schedule", f"an SDXL-architecture checkpoint trained for {what} "
                                                         f"(marker key {marker!r})")
        return Identification("sdxl-base", "an SDXL base checkpoint") if is_base else \
            Identification("sdxl-refiner", "an SDXL refiner checkpoint")
    if has_unet:
        width = {768: " (768-wide context: SD 1.x)", 1024: " (1024-wide context: SD 2.x)",
                 2048: " (2048-wide context: an SDXL base UNet)", 1280: " (1280-wide context: an SDXL refiner UNet)"}
        return Identification("unet-only", "a UNet without text encoders" + width.get(context or 0, ""))
    if "input_blocks.0.0.weight" in shapes or ("conv_in.weight" in shapes and _has_prefix(shapes, "down_blocks.")):
        return Identification("unet-only", "a bare diffusion-model (UNet) file without text encoders or VAE")
    for prefix in ("", VAE_PREFIX):
        if f"{prefix}encoder.conv_in.weight" in shapes and f"{prefix}decoder.conv_in.weight" in shapes:
            return Identification("sdxl-vae", "a VAE (autoencoder) file")
    if _has_prefix(shapes, "text_model.encoder.layers.") or _has_prefix(shapes, "transformer.resblocks."):
        return Identification("text-encoder", "a text-encoder file")
    return Identification("unknown", f"not an SDXL checkpoint; it holds {len(shapes)} tensors: "
                                     f"{top_level_summary(shapes)}")


def _strip(shapes: Shapes, prefix: str) -> dict[str, tuple]:
    return {key[len(prefix):]: tuple(shape) for key, shape in shapes.items() if key.startswith(prefix)}


def _need(shapes: Shapes, key: str, what: str, rank: int | None = None) -> tuple:
    shape = shapes.get(key)
    if shape is None:
        raise StateDictMismatchError(f"cannot read the {what} architecture: tensor {key!r} is missing")
    if rank is not None and len(shape) != rank:
        raise StateDictMismatchError(f"cannot read the {what} architecture: {key!r} has shape {list(shape)}, "
                                     f"a {rank}-D tensor is expected")
    return tuple(shape)


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys `prefix.N.…` (block counts)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in shapes if (m := pattern.match(key))})


def _hint(hints: Mapping[str, str], key: str, default: int) -> int:
    if key not in hints:
        return default
    try:
        value = int(hints[key])
    except (TypeError, ValueError):
        value = 0
    if value <= 0:
        raise CorruptCheckpointError(f"checkpoint metadata {key}={hints[key]!r} is not a positive integer")
    return value


def infer_unet_config(unet: Shapes, hints: Mapping[str, str]) -> UNetConfig:
    """UNet architecture from ldm-layout shapes (keys without `model.diffusion_model.`)."""
    what = "UNet"
    model_channels, in_channels = _need(unet, "input_blocks.0.0.weight", what, 4)[:2]
    out_channels = _need(unet, "out.2.weight", what, 4)[0]
    adm_in_channels = _need(unet, "label_emb.0.0.weight", what, 2)[1]
    blocks = _indices(unet, "input_blocks")
    downsamples = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
    num_res_blocks = downsamples[0] - 1 if downsamples else len(blocks) - 1
    levels = len(downsamples) + 1
    if num_res_blocks < 1 or blocks != list(range(levels * (num_res_blocks + 1))):
        raise StateDictMismatchError(f"cannot read the UNet architecture: input blocks {blocks} with downsamplers at "
                                     f"{downsamples} do not form equal levels")
    channel_mult, depths = [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        width = _need(unet, f"input_blocks.{first}.0.out_layers.3.weight", what, 4)[0]
        if width % model_channels:
            raise StateDictMismatchError(f"cannot read the UNet architecture: level {level} is {width} wide, not a "
                                         f"multiple of the {model_channels}-wide first level")
        channel_mult.append(width // model_channels)
        depths.append(len(_indices(unet, f"input_blocks.{first}.1.transformer_blocks")))
    context_keys = [key for key in unet if key.endswith("attn2.to_k.weight")]
    if not context_keys:
        raise StateDictMismatchError("cannot read the UNet architecture: it has no cross-attention layers")
    return UNetConfig(
        model_channels=model_channels, channel_mult=tuple(channel_mult), transformer_depth=tuple(depths),
        transformer_depth_middle=len(_indices(unet, "middle_block.1.transformer_blocks")),
        context_dim=_need(unet, context_keys[0], what, 2)[1], adm_in_channels=adm_in_channels,
        num_head_channels=_hint(hints, HINT_UNET_HEAD_CHANNELS, DEFAULT_HEAD_WIDTH), num_res_blocks=num_res_blocks,
        in_channels=in_channels, out_channels=out_channels,
        norm_groups=_hint(hints, HINT_UNET_NORM_GROUPS, DEFAULT_NORM_GROUPS))


def infer_vae_config(vae: Shapes, hints: Mapping[str, str]) -> VAEConfig:
    """VAE architecture from ldm-layout shapes (keys without `first_stage_model.`)."""
    what = "VAE"
    base_channels, image_channels = _need(vae, "encoder.conv_in.weight", what, 4)[:2]
    levels = _indices(vae, "encoder.down")
    if not levels or levels != list(range(len(levels))):
        raise StateDictMismatchError(f"cannot read the VAE architecture: encoder levels {levels}")
    mult = []
    for level in levels:
        width = _need(vae, f"encoder.down.{level}.block.0.conv2.weight", what, 4)[0]
        if width % base_channels:
            raise StateDictMismatchError(f"cannot read the VAE architecture: level {level} is {width} wide, not a "
                                         f"multiple of {base_channels}")
        mult.append(width // base_channels)
    # The encoder emits mean and log-variance stacked: twice the latent channels.
    latent_channels = _need(vae, "encoder.conv_out.weight", what, 4)[0] // 2
    return VAEConfig(base_channels=base_channels, channel_mult=tuple(mult),
                     num_res_blocks=len(_indices(vae, "encoder.down.0.block")), latent_channels=latent_channels,
                     image_channels=image_channels, norm_groups=_hint(hints, HINT_VAE_NORM_GROUPS, DEFAULT_NORM_GROUPS),
                     scale_factor=SDXL_VAE.scale_factor)


def _heads(hidden: int, hints: Mapping[str, str], key: str, what: str) -> int:
    if key in hints:
        heads = _hint(hints, key, 0)
    else:
        heads = hidden // DEFAULT_HEAD_WIDTH if hidden % DEFAULT_HEAD_WIDTH == 0 else 0
    if heads <= 0 or hidden % heads:
        raise StateDictMismatchError(f"cannot tell the {what} attention heads: width {hidden} is not a multiple of "
                                     f"{DEFAULT_HEAD_WIDTH} and the file's metadata has no valid {key}")
    return heads


def infer_clip_l_config(clip: Shapes, hints: Mapping[str, str]) -> TextEncoderConfig:
    """CLIP ViT-L text-encoder architecture from transformers-named shapes (keys starting `text_model.`)."""
    what = "CLIP-L text encoder"
    vocab, hidden = _need(clip, "text_model.embeddings.token_embedding.weight", what, 2)
    positions = _need(clip, "text_model.embeddings.position_embedding.weight", what, 2)[0]
    return TextEncoderConfig(
        hidden_size=hidden, num_layers=len(_indices(clip, "text_model.encoder.layers")),
        num_heads=_heads(hidden, hints, HINT_CLIP_L_HEADS, what),
        intermediate_size=_need(clip, "text_model.encoder.layers.0.mlp.fc1.weight", what, 2)[0],
        hidden_act="quick_gelu", projection_dim=None, vocab_size=vocab, max_position_embeddings=positions)


def infer_clip_g_config(clip: Shapes, hints: Mapping[str, str]) -> TextEncoderConfig:
    """OpenCLIP ViT-bigG text-encoder architecture from open_clip-named shapes."""
    what = "OpenCLIP bigG text encoder"
    vocab, hidden = _need(clip, "token_embedding.weight", what, 2)
    return TextEncoderConfig(
        hidden_size=hidden, num_layers=len(_indices(clip, "transformer.resblocks")),
        num_heads=_heads(hidden, hints, HINT_CLIP_G_HEADS, what),
        intermediate_size=_need(clip, "transformer.resblocks.0.mlp.c_fc.weight", what, 2)[0],
        hidden_act="gelu", projection_dim=_need(clip, "text_projection", what, 2)[1], vocab_size=vocab,
        max_position_embeddings=_need(clip, "positional_embedding", what, 2)[0])


def component_prefixes(kind: str) -> dict[str, str]:
    """Single-file key prefix of each component of an SDXL stage ("base" or "refiner")."""
    if kind == "base":
        return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip_l": BASE_CLIP_L_PREFIX, "clip_g": BASE_CLIP_G_PREFIX}
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip_g": REFINER_CLIP_G_PREFIX}


def infer_config(shapes: Shapes, hints: Mapping[str, str] | None = None, *,
                 vae: VAEConfig | None = None) -> SDXLConfig:
    """The SDXLConfig of an original-layout SDXL checkpoint, read from its tensor shapes (plus optional hints).

    `vae` supplies the VAE config when the checkpoint's own VAE is absent or replaced by a separate file.
    """
    hints = hints or {}
    found = identify(shapes)
    if not found.is_sdxl_checkpoint:
        raise StateDictMismatchError(f"cannot infer an SDXL config: this is {found.description}")
    kind = found.kind.removeprefix("sdxl-")
    prefixes = component_prefixes(kind)
    if vae is None:
        vae = infer_vae_config(_strip(shapes, VAE_PREFIX), hints)
    prediction, zsnr = prediction_from_keys(shapes.keys(), hints)
    config = dict(
        prediction=prediction, noise_schedule=NoiseScheduleConfig(zsnr=zsnr),
        unet=infer_unet_config(_strip(shapes, UNET_PREFIX), hints), vae=vae,
        clip_g=infer_clip_g_config(_strip(shapes, prefixes["clip_g"]), hints),
        clip_l=infer_clip_l_config(_strip(shapes, prefixes["clip_l"]), hints) if "clip_l" in prefixes else None,
        adm_scalars=BASE_ADM_SCALARS if kind == "base" else REFINER_ADM_SCALARS)
    try:
        return SDXLConfig(kind=kind, **config)
    except ValueError as error:
        raise StateDictMismatchError(f"the parts of this {kind} checkpoint do not fit together: {error}") from None


def config_hints(config: SDXLConfig) -> dict[str, str]:
    """The metadata `infer_config` needs to rebuild `config` exactly (facts that tensor shapes do not carry)."""
    hints = {HINT_UNET_HEAD_CHANNELS: str(config.unet.num_head_channels),
             HINT_UNET_NORM_GROUPS: str(config.unet.norm_groups), HINT_VAE_NORM_GROUPS: str(config.vae.norm_groups),
             HINT_CLIP_G_HEADS: str(config.clip_g.num_heads)}
    if config.clip_l is not None:
        hints[HINT_CLIP_L_HEADS] = str(config.clip_l.num_heads)
    return hints
