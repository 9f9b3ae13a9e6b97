"""sdxl_core.runtime.vae_decoding: working dtype, NaN guard, tiling accuracy and seams, memory planning, pixel
formats."""

from __future__ import annotations

import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sdxl_core.runtime.vae_decoding as vd
from sdxl_core.config import SDXL_VAE, TINY_VAE
from sdxl_core.models.vae import AutoencoderKL
from sdxl_core.runtime.vae_decoding import (
    comfy_to_images,
    decode_latents,
    default_vae_dtype,
    encode_images,
    estimate_decode_bytes,
    estimate_encode_bytes,
    images_to_comfy,
    resolve_vae_dtype,
    run_tiled,
    to_pil,
    to_uint8,
)
from tests._vae_helpers import one_torch_thread, random_vae, relative_error  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Measured on the tiny VAE with the random weights below (seed 5), latent 24x48 (192x384 px), 256-px tiles with
# 64-px overlap, over latent seeds 0-5: max |tiled - untiled| 0.14-0.24 and mean 0.015-0.023, on images of std
# 0.65 (seed 0, the one the tests draw: max 0.19, mean 0.018). Tiling everything, mid-block attention included,
# gave 0.31-0.86 / 0.027-0.034. The rest comes from per-tile GroupNorm statistics, which random weights make far
# larger than trained ones do; neither ComfyUI nor diffusers tiles exactly either. With 128-px tiles (32-px
# overlap) the max is 0.49-0.69.
TILED_MAX_DIFF = 0.3
TILED_MEAN_DIFF = 0.03
SMALL_TILE_MAX_DIFF = 0.9


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_VAE, seed=5)


@pytest.fixture(scope="module")
def untiled(vae):
    """Latents [1, 4, 24, 48] (seed 0) and their untiled decode, shared by the tiling tests."""
    latents = torch.randn(1, 4, 24, 48, generator=torch.Generator().manual_seed(0))
    return latents, decode_latents(vae, latents, tiled=False)


def _column_jumps(images: torch.Tensor) -> torch.Tensor:
    """Mean |difference| between horizontally adjacent pixels, one value per column boundary j | j+1."""
    return (images[..., 1:] - images[..., :-1]).abs().mean(dim=(0, 1, 2))


def _seam_columns(latent_width: int, tile_px: int, overlap_px: int) -> list[int]:
    spans = vd._tile_spans(latent_width, tile_px // 8, overlap_px // 8)
    starts = {8 * start - 1 for start, _ in spans if start > 0}
    stops = {8 * stop - 1 for _, stop in spans if stop < latent_width}
    return sorted(starts | stops)


# --- tiling ------------------------------------------------------------------------------------------------------


def test_tiled_decode_differs_from_untiled_by_a_bounded_amount(vae, untiled):
    latents, full = untiled
    tiled = decode_latents(vae, latents, tiled=True, tile_size=256, overlap=64)
    diff = (tiled - full).abs()
    print(f"\ntiled (256 px, overlap 64) vs untiled decode, tiny VAE: max {diff.max():.4f}, mean {diff.mean():.4f},"
          f" image std {full.std():.3f}")
    assert tiled.shape == full.shape == (1, 3, 192, 384)
    assert diff.max() > 0.01  # tiles really ran (GroupNorm statistics differ per tile)
    assert diff.max() <= TILED_MAX_DIFF
    assert diff.mean() <= TILED_MEAN_DIFF


def test_cross_fade_leaves_no_seams_where_hard_tile_edges_would(vae, untiled):
    latents, full = untiled
    reference_jump = _column_jumps(full).mean().item()

    blended = decode_latents(vae, latents, tiled=True, tile_size=128, overlap=32)
    seams = _seam_columns(48, 128, 32)
    excess = _column_jumps(blended) - _column_jumps(full)
    elsewhere = torch.ones_like(excess, dtype=torch.bool)
    elsewhere[seams] = False
    # Control: 48 latents in 16-latent tiles without overlap are pasted edge to edge.
    pasted = decode_latents(vae, latents, tiled=True, tile_size=128, overlap=0)
    hard = (_column_jumps(pasted) - _column_jumps(full))[_seam_columns(48, 128, 0)].max().item()
    print(f"\ncolumn-jump excess over the untiled image (its mean jump {reference_jump:.3f}): at cross-faded tile "
          f"edges {excess[seams].max():.4f}, elsewhere up to {excess[elsewhere].abs().max():.4f}; at hard tile "
          f"edges {hard:.4f}")
    # Measured over latent seeds 0-5: cross-faded edges 0.005-0.024, hard edges 0.14-0.17 (mean jump 0.25).
    assert hard > 0.4 * reference_jump  # the metric does see a seam when there is one
    assert excess[seams].max() < 0.2 * reference_jump
    assert excess[seams].max() <= excess[elsewhere].abs().max()  # tile edges do not stand out
    assert (blended - full).abs().max() <= SMALL_TILE_MAX_DIFF


def test_non_multiple_of_tile_sizes_decode_and_encode(vae):
    # 19 x 27 latents in 16-latent tiles: rows (0, 16), (3, 19); columns (0, 16), (11, 27).
    latents = torch.randn(1, 4, 19, 27)
    tiled = decode_latents(vae, latents, tiled=True, tile_size=128, overlap=32)
    assert tiled.shape == (1, 3, 152, 216) and torch.isfinite(tiled).all()
    assert (tiled - decode_latents(vae, latents, tiled=False)).abs().mean() <= 3 * TILED_MEAN_DIFF

    images = torch.rand(1, 3, 152, 216) * 2 - 1
    mean_tiled = encode_images(vae, images, sample=False, tiled=True, tile_size=128, overlap=32)
    mean_full = encode_images(vae, images, sample=False, tiled=False)
    assert mean_tiled.shape == (1, 4, 19, 27) and torch.isfinite(mean_tiled).all()
    assert (mean_tiled - mean_full).abs().mean() <= 0.1 * mean_full.abs().mean()  # measured 0.056-0.062


def test_a_single_tile_is_exactly_the_untiled_result(vae):
    latents = torch.randn(1, 4, 8, 12)
    torch.testing.assert_close(decode_latents(vae, latents, tiled=True, tile_size=128, overlap=32),
                               decode_latents(vae, latents, tiled=False), rtol=0, atol=0)


@pytest.mark.parametrize("shape, tile, overlap", [((2, 3, 13, 21), 5, 2), ((1, 3, 7, 7), 3, 1), ((1, 3, 9, 4), 4, 0)])
def test_run_tiled_reassembles_a_local_function_exactly(shape, tile, overlap):
    """With a position-wise function every blend must reproduce the untiled output: weights are normalised."""
    x = torch.randn(shape)

    def upsample(t):
        return F.interpolate(t, scale_factor=8, mode="nearest") * 2 + 1

    torch.testing.assert_close(run_tiled(upsample, x, tile, overlap, 8.0), upsample(x), rtol=1e-6, atol=1e-6)
    pixels = torch.randn(shape[0], shape[1], shape[2] * 8, shape[3] * 8)
    downsampled = run_tiled(lambda t: F.avg_pool2d(t, 8), pixels, tile * 8, overlap * 8, 1 / 8, grid=8)
    torch.testing.assert_close(downsampled, F.avg_pool2d(pixels, 8), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="whole output cells"):
        run_tiled(lambda t: F.avg_pool2d(t, 8), pixels, tile * 8 + 4, overlap * 8, 1 / 8)


def test_tiled_encode_samples_one_noise_field_for_the_whole_image(vae):
    images = torch.rand(1, 3, 64, 112) * 2 - 1
    kwargs = {"tiled": True, "tile_size": 64, "overlap": 16}
    a = encode_images(vae, images, generator=torch.Generator().manual_seed(3), **kwargs)
    b = encode_images(vae, images, generator=torch.Generator().manual_seed(3), **kwargs)
    mean = encode_images(vae, images, sample=False, **kwargs)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    # (sample - mean) / noise is the per-position std: same noise field as one untiled draw of that shape.
    std = (a - mean) / noise
    assert torch.isfinite(std).all() and (std > 0).all()


@pytest.mark.parametrize("tile_size, overlap, message", [(60, 16, "tile_size"), (32, 8, "tile_size"),
                                                         (128, 12, "overlap"), (128, 72, "overlap")])
def test_bad_tile_geometry_is_rejected(vae, tile_size, overlap, message):
    with pytest.raises(ValueError, match=message):
        decode_latents(vae, torch.randn(1, 4, 8, 8), tiled=True, tile_size=tile_size, overlap=overlap)


# --- NaN guard and working dtype ----------------------------------------------------------------------------------


def _fp16_overflowing_vae():
    """A VAE whose first decoder conv outputs ~1e5 (weights still fp16-representable): fine in fp32, inf in fp16."""
    model = random_vae(TINY_VAE, seed=5)
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(2e4)
        model.decoder.conv_in.bias.mul_(2e4)
    assert model.decoder.conv_in.weight.abs().max() < 65504
    return model


def test_fp16_overflow_is_redone_in_the_safe_dtype(caplog):
    model = _fp16_overflowing_vae()
    latents = torch.randn(1, 4, 4, 4)  # small: fp16 convolutions are slow on the CPU
    with torch.no_grad():
        raw_fp16 = AutoencoderKL(TINY_VAE, dtype=torch.float16)
        raw_fp16.load_state_dict(model.state_dict())
        assert not torch.isfinite(raw_fp16.decode(latents)).all()  # the unguarded fp16 decode is broken
    expected = decode_latents(model, latents, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="sdxl_core.runtime.vae_decoding"):
        guarded = decode_latents(model, latents, dtype=torch.float16)
    assert torch.isfinite(guarded).all()
    torch.testing.assert_close(guarded, expected, rtol=0, atol=0)  # on the CPU the safe dtype is fp32
    assert "float16" in caplog.text and "Redoing it in float32" in caplog.text
    assert model.dtype == torch.float32  # the caller's module was not cast


def test_fp16_overflow_is_redone_in_bf16_where_supported(monkeypatch, caplog):
    monkeypatch.setattr(vd, "_bf16_supported", lambda device: True)
    model = _fp16_overflowing_vae()
    latents = torch.randn(1, 4, 4, 4)
    expected = decode_latents(model, latents, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="sdxl_core.runtime.vae_decoding"):
        guarded = decode_latents(model, latents, dtype=torch.float16)
    assert "Redoing it in bfloat16" in caplog.text
    assert torch.isfinite(guarded).all() and relative_error(guarded, expected) < 5e-2


def test_fp16_encode_overflow_is_redone():
    model = random_vae(TINY_VAE, seed=6)
    with torch.no_grad():
        model.encoder.conv_in.weight.mul_(5e4)
    images = torch.rand(1, 3, 24, 24) * 2 - 1
    expected = encode_images(model, images, sample=False, dtype=torch.float32)
    guarded = encode_images(model, images, sample=False, dtype=torch.float16)
    assert torch.isfinite(guarded).all()
    torch.testing.assert_close(guarded, expected, rtol=0, atol=0)


def test_nan_latents_are_reported_before_decoding(vae, monkeypatch):
    monkeypatch.setattr(vae, "decode_features", lambda z: pytest.fail("decoding must not start on a NaN latent"))
    monkeypatch.setattr(vae, "decode", lambda z: pytest.fail("decoding must not start on a NaN latent"))
    latents = torch.randn(1, 4, 8, 8)
    latents[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"latents contain NaN .*1 of 256.*sampler"):
        decode_latents(vae, latents)


def test_corrupt_weights_raise_a_clear_error():
    model = random_vae(TINY_VAE, seed=7)
    with torch.no_grad():
        model.decoder.up[0].block[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="weights contain 1 NaN or infinite"):
        decode_latents(model, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("dtype, message", [(torch.float32, "overflow even float32"),
                                            (torch.bfloat16, "try dtype=torch.float32")])
def test_overflow_with_finite_weights_says_so(dtype, message):
    model = random_vae(TINY_VAE, seed=7)
    with torch.no_grad():
        model.decoder.conv_in.weight.mul_(1e37)  # finite in fp32 and bf16, but the convolution's sums are not
    with pytest.raises(FloatingPointError, match=message):
        decode_latents(model, torch.randn(1, 4, 4, 4), dtype=dtype)


def test_default_dtype_is_never_fp16(monkeypatch):
    assert default_vae_dtype("cpu") == torch.float32
    assert resolve_vae_dtype(random_vae(TINY_VAE, dtype=torch.float16), None) == torch.float32
    assert resolve_vae_dtype(random_vae(TINY_VAE, dtype=torch.bfloat16), None) == torch.float32  # CPU: like ComfyUI
    assert resolve_vae_dtype(random_vae(TINY_VAE), torch.float16) == torch.float16  # explicit requests are honoured
    monkeypatch.setattr(vd, "_bf16_supported", lambda device: True)
    assert default_vae_dtype("cpu") == torch.bfloat16
    assert resolve_vae_dtype(random_vae(TINY_VAE, dtype=torch.float16), None) == torch.bfloat16
    assert resolve_vae_dtype(random_vae(TINY_VAE), None) == torch.float32  # a caller's fp32 VAE stays fp32
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        resolve_vae_dtype(random_vae(TINY_VAE), torch.float64)


def test_decode_in_another_dtype_does_not_touch_the_callers_vae_or_latents(vae):
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    latents_before = latents.clone()
    images = decode_latents(vae, latents, dtype=torch.bfloat16)
    assert images.dtype == torch.float32 and vae.dtype == torch.float32
    assert relative_error(images, decode_latents(vae, latents)) < 5e-2
    torch.testing.assert_close(latents, latents_before, rtol=0, atol=0)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


# --- memory planning ----------------------------------------------------------------------------------------------


class _LiveActivationBytes(TorchDispatchMode):
    """Peak bytes of live tensors an eager pass creates (works on the meta device: nothing is allocated)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view() and id(t) not in self.tracked:
                size = t.untyped_storage().nbytes()
                self.tracked.add(id(t))
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, id(t), size)
        return out

    def _release(self, key, size):
        self.live -= size
        self.tracked.discard(key)


def test_memory_estimate_constants_match_a_meta_dry_run_of_the_full_vae():
    # 256x256: large enough that full-resolution activations dominate, small enough that the meta device's
    # materialised attention scores (CUDA's fused kernels never build them) stay below that peak.
    full = AutoencoderKL(SDXL_VAE, dtype=torch.bfloat16, device="meta")
    side = 256
    with torch.no_grad():
        meter = _LiveActivationBytes()
        with meter:
            # the submodules directly: `decode` refuses weightless meta models
            full.decoder(full.post_quant_conv(torch.zeros(1, 4, side // 8, side // 8, dtype=torch.bfloat16,
                                                          device="meta")))
        decode_peak = meter.peak
        meter = _LiveActivationBytes()
        with meter:
            full.quant_conv(full.encoder(torch.zeros(1, 3, side, side, dtype=torch.bfloat16, device="meta")))
        encode_peak = meter.peak
    headroom = vd._ALLOCATOR_HEADROOM
    decode_estimate = estimate_decode_bytes(full, 1, side, side, torch.bfloat16) / headroom
    encode_estimate = estimate_encode_bytes(full, 1, side, side, torch.bfloat16) / headroom
    print(f"\nmeta dry run, per pixel: decode {decode_peak / side**2 / 2:.0f} elements (constant "
          f"{decode_estimate / side**2 / 2:.0f}), encode {encode_peak / side**2 / 2:.0f} (constant "
          f"{encode_estimate / side**2 / 2:.0f}); 1024^2 bf16 decode budget "
          f"{estimate_decode_bytes(full, 1, 1024, 1024, torch.bfloat16) / 1e9:.2f} GB")
    # 1% slack for the per-group mean/rstd vectors GroupNorm returns beside its output.
    assert 0.99 * decode_peak <= decode_estimate <= 1.05 * decode_peak
    assert 0.99 * encode_peak <= encode_estimate <= 1.05 * encode_peak


def _recording(model, calls):
    """`model.decoder.upsampling`, the full-resolution part both decode paths run, recording its input shapes."""
    original = model.decoder.upsampling

    def upsampling(h):
        calls.append(tuple(h.shape))
        return original(h)

    return upsampling


def test_batch_is_split_when_one_image_fits_but_the_batch_does_not(vae, monkeypatch):
    latents = torch.randn(3, 4, 8, 8)
    per_image = estimate_decode_bytes(vae, 1, 64, 64, torch.float32)
    monkeypatch.setattr(vd, "available_device_memory", lambda device: int(1.5 * per_image))
    calls = []
    monkeypatch.setattr(vae.decoder, "upsampling", _recording(vae, calls))
    images = decode_latents(vae, latents)
    assert [c[0] for c in calls] == [1, 1, 1] and all(c[-2:] == (8, 8) for c in calls)
    monkeypatch.undo()
    torch.testing.assert_close(images, decode_latents(vae, latents, tiled=False), rtol=1e-5, atol=1e-5)


def test_tiles_are_used_when_one_image_does_not_fit(vae, monkeypatch):
    latents = torch.randn(1, 4, 24, 24)
    monkeypatch.setattr(vd, "available_device_memory", lambda device: 1000)
    automatic = decode_latents(vae, latents, tile_size=128, overlap=32)
    torch.testing.assert_close(automatic, decode_latents(vae, latents, tiled=True, tile_size=128, overlap=32),
                               rtol=0, atol=0)
    assert (automatic - decode_latents(vae, latents, tiled=False)).abs().max() > 0


def _oom_above(model, max_side, calls):
    """`model.decoder.upsampling` running out of memory on inputs wider or taller than `max_side` latents."""
    original = model.decoder.upsampling

    def upsampling(h):
        calls.append(tuple(h.shape[-2:]))
        if max(h.shape[-2:]) > max_side:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(h)

    return upsampling


def test_out_of_memory_falls_back_to_tiles(vae, monkeypatch, caplog):
    latents = torch.randn(1, 4, 16, 16)
    expected = decode_latents(vae, latents, tiled=True, tile_size=64, overlap=16)
    calls = []
    monkeypatch.setattr(vae.decoder, "upsampling", _oom_above(vae, 8, calls))
    with caplog.at_level(logging.WARNING, logger="sdxl_core.runtime.vae_decoding"):
        images = decode_latents(vae, latents, tile_size=64, overlap=16)
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert calls[0] == (16, 16) and set(calls[1:]) == {(8, 8)}
    assert "ran out of memory; retrying in 64-pixel tiles" in caplog.text


def test_out_of_memory_in_tiles_shrinks_them_then_gives_up(vae, monkeypatch):
    latents = torch.randn(1, 4, 12, 12)
    calls = []
    monkeypatch.setattr(vae.decoder, "upsampling", _oom_above(vae, 8, calls))
    images = decode_latents(vae, latents, tiled=True, tile_size=128, overlap=64)
    # 128-px tiles (one 12x12 tile) run out of memory; 64-px tiles with the overlap cut to 16 px fit.
    assert images.shape == (1, 3, 96, 96) and calls == [(12, 12)] + [(8, 8)] * 4
    monkeypatch.setattr(vae.decoder, "upsampling", _oom_above(vae, 4, calls))
    with pytest.raises(torch.OutOfMemoryError):  # 64 px is the smallest tile
        decode_latents(vae, latents, tiled=True, tile_size=128, overlap=64)
    with pytest.raises(torch.OutOfMemoryError):  # tiled=False never tiles
        decode_latents(vae, latents, tiled=False)


def test_no_tiling_by_estimate_on_the_cpu(vae):
    assert vd.available_device_memory(torch.device("cpu")) is None


def test_cuda_free_memory_counts_the_allocators_unused_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2_500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2_000)
    assert vd.available_device_memory(torch.device("cuda", 0)) == 3_500


@pytest.mark.parametrize("emulated_only, expected", [(False, torch.bfloat16), (True, torch.float32)])
def test_cuda_default_dtype_is_bf16_only_with_native_support(monkeypatch, emulated_only, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or not emulated_only)
    assert default_vae_dtype("cuda") == expected


# --- pixel formats ------------------------------------------------------------------------------------------------


def test_comfy_image_round_trip_and_clamping():
    images = torch.linspace(-1.5, 1.5, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    comfy = images_to_comfy(images.to(torch.bfloat16))
    assert comfy.shape == (2, 4, 5, 3) and comfy.dtype == torch.float32 and comfy.device.type == "cpu"
    assert comfy.min() == 0.0 and comfy.max() == 1.0
    torch.testing.assert_close(comfy, ((images.to(torch.bfloat16).float() + 1) / 2).clamp(0, 1).movedim(1, -1))
    back = comfy_to_images(comfy)
    assert back.shape == (2, 3, 4, 5)
    torch.testing.assert_close(back, images.to(torch.bfloat16).float().clamp(-1, 1), rtol=0, atol=1e-6)


def test_comfy_to_images_rejects_other_layouts():
    with pytest.raises(ValueError, match=r"alpha channel"):
        comfy_to_images(torch.zeros(1, 8, 8, 4))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(1, 3, 8, 8\)"):
        comfy_to_images(torch.zeros(1, 3, 8, 8))


def test_uint8_conversion_truncates_like_comfyui():
    # 0..1 values 0.9999 (rounds to 255, truncates to 254), 0.5 (127.5 -> 127), 0, 1
    unit = torch.tensor([0.9999, 0.5, 0.0, 1.0]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    pixels = to_uint8(unit * 2 - 1)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 1, 4, 3)
    assert pixels[0, 0, :, 0].tolist() == [254, 127, 0, 255]


def test_to_pil():
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    pil = to_pil(images)
    assert len(pil) == 2 and pil[0].size == (24, 16) and pil[0].mode == "RGB"
    assert pil[1].getpixel((0, 0)) == tuple(to_uint8(images)[1, 0, 0].tolist())


@pytest.mark.heavy
def test_full_size_tiled_decode_and_fp16_guard():
    """Full-size SDXL VAE, random weights: tiled vs untiled at 256x384 px (max 0.11, mean 0.008 on image std 0.54
    when measured), and an fp16 decode through the guard (a few minutes on a 2-core CPU)."""
    model = random_vae(SDXL_VAE, seed=12)
    latents = torch.randn(1, 4, 32, 48)
    full = decode_latents(model, latents, tiled=False)
    tiled = decode_latents(model, latents, tiled=True, tile_size=256, overlap=64)
    diff = (tiled - full).abs()
    print(f"\nfull-size VAE, tiled (256 px, overlap 64) vs untiled: max {diff.max():.4f}, mean {diff.mean():.4f}, "
          f"image std {full.std():.3f}")
    assert torch.isfinite(tiled).all() and diff.mean() <= 0.03 * full.std() and diff.max() <= 0.25
    small = latents[..., :4, :4]  # fp16 convolutions are slow on the CPU
    assert decode_latents(model, small, dtype=torch.float16).isfinite().all()
