"""Decoding and encoding that never hand back a black image: working dtype, NaN guard, tiling, pixel formats.

`decode_latents` / `encode_images` wrap `AutoencoderKL.decode` / `.encode` with what a UI needs around them:
- a safe working dtype by default (ComfyUI's SDXL VAE `working_dtypes` are [bf16, fp32]: never fp16 by default);
- a guard that redoes a non-finite fp16 result in bf16 / fp32 (the SDXL VAE overflows fp16) and otherwise fails
  with an error that says whether the latent, the weights or the arithmetic is to blame;
- tiled processing with linear cross-fades, on request, when the estimated memory exceeds what the device has
  free, or after an out-of-memory error (ComfyUI's VAEDecode falls back the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..config import VAEConfig
from ..models.vae import AutoencoderKL, sample_posterior

logger = logging.getLogger(__name__)

# Tile geometry in pixels, for decode and encode alike (ComfyUI `VAEDecodeTiled` defaults: 512, overlap 64).
DEFAULT_TILE_SIZE = 512
DEFAULT_TILE_OVERLAP = 64
# Smallest tile the out-of-memory retries shrink to (ComfyUI `VAEDecodeTiled` minimum).
MIN_TILE_SIZE = 64

# Peak live activations of one eager pass, in elements per *full-resolution pixel* per base channel, measured by a
# meta-device dry run of the full SDXL VAE (tests/runtime/test_vae_decoding.py re-measures them): the decoder peaks in
# level 0's first res block, which holds its 2C-wide input, the GroupNorm output of that input and the C-wide
# conv output (2C + 2C + C = 5C with C = base_channels); the encoder peaks in level 0 at 4C plus the input image.
# The quadratic scores of the mid-block attention are left out: CUDA's fused SDPA kernels never materialise them.
_DECODE_ELEMENTS_PER_PIXEL_PER_CHANNEL = 5
_ENCODE_ELEMENTS_PER_PIXEL_PER_CHANNEL = 4
# Measured activations are a floor: the CUDA caching allocator fragments and cuDNN takes workspaces. 2x puts a
# 1024x1024 bf16 decode at 2.7 GB, between the live-tensor floor (1.3 GB) and the published budgets (ComfyUI
# ~4.6 GB bf16, diffusers peaks ~7.5 GB fp16 with its less frugal blocks; docs/performance.md#memory). An
# underestimate is caught by the out-of-memory retry, an overestimate costs only a tiled pass, so the middle is the
# right place.
_ALLOCATOR_HEADROOM = 2.0


# ---------------------------------------------------------------------------------------------------------------
# Working dtype


def _bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False  # ComfyUI `should_use_bf16` is False on the CPU: bf16 there is slower than fp32 and less exact


def default_vae_dtype(device: torch.device | str) -> torch.dtype:
    """The VAE working dtype ComfyUI picks for SDXL (`vae_dtype` over working_dtypes [bf16, fp32]): never fp16."""
    device = torch.device(device)
    return torch.bfloat16 if _bf16_supported(device) else torch.float32


def resolve_vae_dtype(vae: AutoencoderKL, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` when given; else the VAE's own dtype when that is a safe one; else the device's safe default."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"VAE dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    own = vae.dtype
    if own == torch.float32 or (own == torch.bfloat16 and _bf16_supported(vae.device)):
        return own
    return default_vae_dtype(vae.device)


def _vae_in_dtype(vae: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    """`vae` itself, or a cast copy when `dtype` differs: the caller's module is never modified."""
    if vae.dtype == dtype:
        return vae
    copy = AutoencoderKL(vae.config, dtype=dtype, device="meta")
    copy.load_state_dict({k: v.to(dtype) for k, v in vae.state_dict().items()}, strict=True, assign=True)
    return copy.eval()


# ---------------------------------------------------------------------------------------------------------------
# Memory


def estimate_decode_bytes(vae: AutoencoderKL | VAEConfig, batch: int, height: int, width: int,
                          dtype: torch.dtype) -> int:
    """Device memory an untiled decode to `batch` images of height x width pixels needs (see the constants); from
    the VAE or, before it is read, its config."""
    config = vae if isinstance(vae, VAEConfig) else vae.config
    elements = _DECODE_ELEMENTS_PER_PIXEL_PER_CHANNEL * config.base_channels * batch * height * width
    return int(elements * torch.empty((), dtype=dtype).element_size() * _ALLOCATOR_HEADROOM)


def estimate_encode_bytes(vae: AutoencoderKL, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Device memory an untiled encode of `batch` images of height x width pixels needs (see the constants)."""
    per_pixel = _ENCODE_ELEMENTS_PER_PIXEL_PER_CHANNEL * vae.config.base_channels + vae.config.image_channels
    return int(per_pixel * batch * height * width * torch.empty((), dtype=dtype).element_size()
               * _ALLOCATOR_HEADROOM)


def available_device_memory(device: torch.device) -> int | None:
    """Bytes a pass on `device` can still allocate, or None where that is not known (then never tile by estimate)."""
    if device.type != "cuda":
        return None  # the CPU pages rather than failing; tile there only when asked
    free, _total = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached_unused


def _free_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Tiling


def _tile_spans(length: int, tile: int, overlap: int, grid: int = 1) -> list[tuple[int, int]]:
    """(start, stop) of the fewest tiles covering [0, length) with at least `overlap` between neighbours.

    Starts are spread evenly (multiples of `grid`), so the first and last tiles sit flush with the ends, every
    tile has full size and the extra overlap a non-multiple length needs is shared out instead of piling up on
    one near-duplicate tile at the end.
    """
    if length <= tile:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    cells = (length - tile) // grid
    starts = [grid * (i * cells // (count - 1)) for i in range(count)]
    if starts[-1] != length - tile:
        raise ValueError(f"length {length} and tile {tile} must be multiples of the tile grid {grid}")
    return [(s, s + tile) for s in starts]


def _crossfade_weights(spans: list[tuple[int, int]], index: int, scale: float, device: torch.device
                       ) -> torch.Tensor:
    """1-D blend weights of tile `index` in output units: linear ramps over the real overlap with each neighbour.

    Neighbouring ramps are complementary ((i+1)/(n+1) rising, (n-i)/(n+1) falling), so the weights of two tiles
    that meet sum to 1. Where a short tile's two ramps overlap they multiply; the blend divides by the summed
    weights, so any positive weights give a normalised result.
    """
    start, stop = spans[index]
    size = round((stop - start) * scale)
    weights = torch.ones(size, dtype=torch.float32, device=device)
    if index > 0:
        n = round((spans[index - 1][1] - start) * scale)
        weights[:n] *= torch.arange(1, n + 1, dtype=torch.float32, device=device) / (n + 1)
    if index < len(spans) - 1:
        n = round((stop - spans[index + 1][0]) * scale)
        weights[size - n:] *= torch.arange(n, 0, -1, dtype=torch.float32, device=device) / (n + 1)
    return weights


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              scale: float, grid: int = 1) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x [B, C, H, W] and cross-fade the outputs (float32, sides x `scale`).

    `tile` and `overlap` are in input units, tile starts multiples of `grid` (8 when encoding, so that each tile
    maps onto whole latent cells); `fn` must map an h x w tile to (h*scale) x (w*scale).
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap {overlap} for tile {tile}")
    rows = _tile_spans(x.shape[-2], tile, overlap, grid)
    cols = _tile_spans(x.shape[-1], tile, overlap, grid)
    if any(abs(v * scale - round(v * scale)) > 1e-9 for span in rows + cols for v in span):
        raise ValueError(f"tiles {rows} x {cols} do not map onto whole output cells at scale {scale}; "
                         f"choose a grid that makes every tile start and end a multiple of {1 / scale:g}")
    out = weight = None
    for r, (top, bottom) in enumerate(rows):
        for c, (left, right) in enumerate(cols):
            piece = fn(x[..., top:bottom, left:right]).float()
            if out is None:
                out_h, out_w = round(x.shape[-2] * scale), round(x.shape[-1] * scale)
                out = piece.new_zeros(piece.shape[0], piece.shape[1], out_h, out_w)
                weight = piece.new_zeros(1, 1, out_h, out_w)
            mask = (_crossfade_weights(rows, r, scale, piece.device)[:, None]
                    * _crossfade_weights(cols, c, scale, piece.device)[None, :])
            y0, x0 = round(top * scale), round(left * scale)
            region = (..., slice(y0, y0 + piece.shape[-2]), slice(x0, x0 + piece.shape[-1]))
            out[region] += piece * mask
            weight[region] += mask
    return out / weight


def _check_tile_geometry(tile_size: int, overlap: int, multiple: int) -> None:
    if tile_size < MIN_TILE_SIZE or tile_size % multiple:
        raise ValueError(f"tile_size must be a multiple of {multiple} pixels and at least {MIN_TILE_SIZE}, "
                         f"got {tile_size}")
    if overlap < 0 or overlap % multiple or 2 * overlap > tile_size:
        raise ValueError(f"overlap must be a multiple of {multiple} pixels between 0 and tile_size / 2 "
                         f"({tile_size // 2}), got {overlap}")


# ---------------------------------------------------------------------------------------------------------------
# The guarded, memory-aware driver shared by decode and encode


def _nonfinite_summary(x: torch.Tensor) -> str:
    bad = (~torch.isfinite(x)).sum().item()
    return f"{bad} of {x.numel()} values are NaN or infinite"


def _count_nonfinite_weights(vae: AutoencoderKL) -> int:
    return sum(int((~torch.isfinite(p)).sum().item()) for p in vae.parameters())


def _run_planned(run: Callable[[AutoencoderKL, torch.Tensor, int, int], torch.Tensor], vae: AutoencoderKL,
                 x: torch.Tensor, *, tiled: bool | None, tile_size: int, overlap: int, multiple: int,
                 estimate: Callable[[int], int], what: str) -> torch.Tensor:
    """Run `run(vae, chunk, tile_px, overlap_px)` (tile_px 0 = untiled) over the batch, planning memory use.

    `estimate(batch)` is the memory an untiled pass needs. tiled=None: split the batch, or tile, when the estimate
    exceeds the free device memory, and retry in tiles after an out-of-memory error; tiled=True: always tile, and
    halve the tiles after out-of-memory; tiled=False: never tile.
    """
    batch = x.shape[0]
    chunk, tile = batch, (tile_size if tiled else 0)
    available = available_device_memory(vae.device) if tiled is None else None
    if available is not None and estimate(batch) > available:
        per_sample = estimate(1)
        if per_sample <= available:
            chunk = max(1, available // per_sample)
        else:
            chunk, tile = 1, tile_size
            logger.info("VAE %s: an estimated %.1f GB per image exceeds the %.1f GB free; working in %d-pixel "
                        "tiles", what, per_sample / 1e9, available / 1e9, tile)
    while True:
        try:
            return torch.cat([run(vae, part, tile, overlap) for part in x.split(chunk)])
        except torch.OutOfMemoryError:
            if tiled is False or (tile and tile // 2 < MIN_TILE_SIZE):
                raise
        # Outside the except block: the traceback, and the activations its frames hold, are released by now.
        _free_cached_memory(vae.device)
        if not tile:
            chunk, tile = 1, tile_size
            logger.warning("VAE %s ran out of memory; retrying in %d-pixel tiles", what, tile)
        else:
            tile = tile // 2 // multiple * multiple
            overlap = min(overlap, tile // 4 // multiple * multiple)
            logger.warning("VAE %s ran out of memory in tiles; retrying with %d-pixel tiles", what, tile)


def _guarded(attempt: Callable[[AutoencoderKL], torch.Tensor], vae: AutoencoderKL, dtype: torch.dtype,
             what: str) -> torch.Tensor:
    """Run `attempt` in `dtype`; a non-finite fp16 result is redone in the device's safe dtype, else an error."""
    result = attempt(_vae_in_dtype(vae, dtype))
    if torch.isfinite(result).all():
        return result
    if dtype == torch.float16:
        fallback = default_vae_dtype(vae.device)
        logger.warning("VAE %s in float16 gave non-finite values (%s): the SDXL VAE overflows fp16. Redoing it "
                       "in %s.", what, _nonfinite_summary(result), str(fallback).removeprefix("torch."))
        dtype = fallback
        result = attempt(_vae_in_dtype(vae, dtype))
        if torch.isfinite(result).all():
            return result
    bad_weights = _count_nonfinite_weights(vae)
    if bad_weights:
        cause = f"the VAE weights contain {bad_weights} NaN or infinite values: the checkpoint is corrupt"
    elif dtype != torch.float32:
        cause = "weights and input are finite, so the arithmetic overflowed; try dtype=torch.float32"
    else:
        cause = "weights and input are finite but overflow even float32: they are far outside the trained range"
    raise FloatingPointError(f"VAE {what} in {dtype} produced non-finite output ({_nonfinite_summary(result)}); "
                             f"{cause}")


def _check_input(x: torch.Tensor, channels: int, what: str, hint: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != channels:
        found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a [B, {channels}, H, W] tensor, got {found}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or infinite values ({_nonfinite_summary(x)}) before the VAE ran; "
                         f"{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, *, tiled: bool | None = None,
                   tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_TILE_OVERLAP,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Raw latents [B, 4, h, w] -> float32 images [B, 3, 8h, 8w] in [-1, 1] (unclamped) on the VAE's device.

    `tile_size` and `overlap` are in pixels (multiples of 8). `tiled`: None = automatic (by memory estimate on
    CUDA, and after out-of-memory), True = always tiled, False = never. `dtype`: working precision; default the
    VAE's own when bf16/fp32, else bf16 where supported, else fp32.
    """
    down = vae.config.downscale
    _check_input(latents, vae.config.latent_channels, "latents",
                 "the sampler diverged or the latent was corrupted upstream: there is nothing to decode")
    _check_tile_geometry(tile_size, overlap, down)
    dtype = resolve_vae_dtype(vae, dtype)
    latents = latents.to(vae.device)

    def run(model: AutoencoderKL, z: torch.Tensor, tile_px: int, overlap_px: int) -> torch.Tensor:
        if not tile_px:
            return model.decode(z).float()
        # The mid block's attention is global and cheap at latent resolution: run it on the whole latent and tile
        # only the full-resolution convolutions after it (halves the tiling error of tiling everything).
        features = model.decode_features(z)
        return run_tiled(model.images_from_features, features, tile_px // down, overlap_px // down, float(down))

    def estimate(batch: int) -> int:
        return estimate_decode_bytes(vae, batch, latents.shape[-2] * down, latents.shape[-1] * down, dtype)

    def attempt(model: AutoencoderKL) -> torch.Tensor:
        return _run_planned(run, model, latents, tiled=tiled, tile_size=tile_size, overlap=overlap, multiple=down,
                            estimate=estimate, what="decode")

    return _guarded(attempt, vae, dtype, "decode")


@torch.no_grad()
def encode_images(vae: AutoencoderKL, images: torch.Tensor, *, sample: bool = True,
                  generator: torch.Generator | None = None, tiled: bool | None = None,
                  tile_size: int = DEFAULT_TILE_SIZE, overlap: int = DEFAULT_TILE_OVERLAP,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> float32 raw latents [B, 4, H/8, W/8] on the VAE's device.

    A posterior sample by default (`generator` as in `AutoencoderKL.encode`), the mean with sample=False. Tiles
    cover only the full-resolution convolutions; the mid block and the posterior see the whole latent, and the
    sample is drawn once for the whole image, so tiling adds no seams to the noise. Other arguments as in
    `decode_latents`.
    """
    down = vae.config.downscale
    _check_input(images, vae.config.image_channels, "images", "fix the image before encoding it")
    if images.shape[-2] % down or images.shape[-1] % down:
        raise ValueError(f"image height and width must be multiples of {down}, got "
                         f"{images.shape[-2]}x{images.shape[-1]}; crop or pad the image first")
    _check_tile_geometry(tile_size, overlap, down)
    dtype = resolve_vae_dtype(vae, dtype)
    images = images.to(vae.device)

    def run(model: AutoencoderKL, x: torch.Tensor, tile_px: int, overlap_px: int) -> torch.Tensor:
        if tile_px:
            # Tile the full-resolution convolutions only; the mid block's global attention sees the whole latent.
            features = run_tiled(model.encode_features, x, tile_px, overlap_px, 1.0 / down, grid=down)
            moments = model.moments_from_features(features.to(model.dtype))
        else:
            moments = model.encode_moments(x)
        return torch.cat(moments, dim=1).float()

    def estimate(batch: int) -> int:
        return estimate_encode_bytes(vae, batch, images.shape[-2], images.shape[-1], dtype)

    def attempt(model: AutoencoderKL) -> torch.Tensor:
        return _run_planned(run, model, images, tiled=tiled, tile_size=tile_size, overlap=overlap, multiple=down,
                            estimate=estimate, what="encode")

    mean, logvar = _guarded(attempt, vae, dtype, "encode").chunk(2, dim=1)
    return sample_posterior(mean, logvar, generator) if sample else mean


# ---------------------------------------------------------------------------------------------------------------
# Pixel formats


def images_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """NCHW images in [-1, 1] -> ComfyUI IMAGE: float32 [B, H, W, C] in 0..1 on the CPU (`comfy/sd.py` decode)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, C, H, W] tensor, got {found}")
    # float32 before the affine map, so bf16 decodes are not quantised a second time.
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).contiguous().cpu()


def comfy_to_images(pixels: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, 3] in 0..1 -> float32 NCHW images in [-1, 1], ready for `encode_images`."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[-1] != 3:
        found = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"a ComfyUI IMAGE must be a [B, H, W, 3] tensor, got {found}"
                         + ("; drop the alpha channel first (pixels[..., :3])"
                            if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 and pixels.shape[-1] == 4
                            else ""))
    return (pixels.to(device=device, dtype=torch.float32).movedim(-1, 1) * 2.0 - 1.0).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """NCHW images in [-1, 1] -> uint8 [B, H, W, C] on the CPU.

    Truncates after clamp * 255, as ComfyUI's SaveImage (`np.clip(255. * i, 0, 255).astype(np.uint8)`) and sgm do;
    diffusers rounds instead, so its PNGs are brighter by up to one level (docs/architecture.md#vae).
    """
    return (255.0 * images_to_comfy(images)).clamp(0.0, 255.0).to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """NCHW images in [-1, 1] -> a list of RGB PIL images (uint8 by truncation, see `to_uint8`)."""
    from PIL import Image

    if images.shape[1] != 3:
        raise ValueError(f"to_pil expects 3-channel RGB images, got {images.shape[1]} channels")
    return [Image.fromarray(array.numpy()) for array in to_uint8(images)]
