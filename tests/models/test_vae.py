"""sdxl_core.models.vae: checkpoint layout, parity with diffusers on identical random weights, dtypes, posterior."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from sdxl_core.config import SDXL_VAE, TINY_VAE, VAEConfig
from sdxl_core.models.vae import AutoencoderKL, sample_posterior
from tests._diffusers_twins import diffusers_vae
from tests._vae_helpers import one_torch_thread, random_vae, relative_error  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MANIFEST = pathlib.Path(__file__).resolve().parents[1] / "data" / "manifests" / "sdxl_base_manifest.json"
PREFIX = "first_stage_model."


def _manifest_vae_shapes() -> dict[str, tuple[int, ...]]:
    if not MANIFEST.exists():
        pytest.skip(f"checkpoint manifest not found at {MANIFEST}")
    entries = json.loads(MANIFEST.read_text())
    return {k[len(PREFIX):]: tuple(v["shape"]) for k, v in entries.items() if k.startswith(PREFIX)}


def test_full_size_keys_and_shapes_match_the_checkpoint_manifest():
    vae = AutoencoderKL(SDXL_VAE, device="meta")
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = _manifest_vae_shapes()
    assert sorted(set(expected) - set(ours)) == [], "keys in the checkpoint the model lacks"
    assert sorted(set(ours) - set(expected)) == [], "keys in the model the checkpoint lacks"
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert sum(v.numel() for v in vae.parameters()) == 83_653_863  # docs/architecture.md#vae


def test_meta_construction_allocates_nothing_and_loads_by_assignment():
    vae = AutoencoderKL(TINY_VAE, device="meta")
    assert all(p.is_meta for p in vae.parameters())
    with pytest.raises(RuntimeError, match="meta device and has no weights"):
        vae.decode(torch.zeros(1, 4, 4, 4))
    source = random_vae(TINY_VAE, seed=3)
    vae.load_state_dict(source.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in vae.parameters())
    latents = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(latents), source.decode(latents), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_pair():
    vae = random_vae(TINY_VAE, seed=1)
    return vae, diffusers_vae(vae)


def test_decode_matches_diffusers_tiny(tiny_pair):
    vae, reference = tiny_pair
    latents = 3.0 * torch.randn(2, 4, 5, 7)  # non-square, odd latent size
    with torch.no_grad():
        ours = vae.decode(latents)
        theirs = reference.decode(latents).sample
    assert ours.shape == (2, 3, 40, 56)
    assert ours.std() > 0.1  # the random weights give a non-trivial image
    err = relative_error(ours, theirs)
    print(f"decode relative error vs diffusers: {err:.2e}")
    assert err <= 1e-5


def test_encode_mean_matches_diffusers_tiny(tiny_pair):
    vae, reference = tiny_pair
    images = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images, sample=False)
        dist = reference.encode(images).latent_dist
        moments_mean, moments_logvar = vae.encode_moments(images)
    assert mean.shape == (2, 4, 6, 8)
    assert mean.std() > 0.1
    err = relative_error(mean, dist.mean)
    print(f"encode-mean relative error vs diffusers: {err:.2e}")
    assert err <= 1e-5
    assert relative_error(moments_logvar.clamp(-30, 20), dist.logvar) <= 1e-5
    torch.testing.assert_close(moments_mean, mean, rtol=0, atol=0)


def test_encode_sample_matches_diffusers_with_the_same_generator(tiny_pair):
    vae, reference = tiny_pair
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(images, generator=torch.Generator().manual_seed(7))
        again = vae.encode(images, generator=torch.Generator().manual_seed(7))
        other = vae.encode(images, generator=torch.Generator().manual_seed(8))
        theirs = reference.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        mean = vae.encode(images, sample=False)
    assert relative_error(ours, theirs) <= 1e-5
    torch.testing.assert_close(ours, again, rtol=0, atol=0)
    assert not torch.allclose(ours, other)
    assert not torch.allclose(ours, mean)


def test_encode_sample_uses_the_global_cpu_generator_without_one():
    mean = torch.zeros(1, 4, 2, 2)
    logvar = torch.zeros(1, 4, 2, 2)
    torch.manual_seed(5)
    drawn = sample_posterior(mean, logvar)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, torch.randn(1, 4, 2, 2), rtol=0, atol=0)


def test_posterior_sample_statistics_and_logvar_clamp():
    mean = torch.full((1, 4, 64, 64), 2.0)
    logvar = torch.full((1, 4, 64, 64), 2.0 * torch.log(torch.tensor(0.5)).item())  # std 0.5
    z = sample_posterior(mean, logvar, torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    huge = sample_posterior(torch.zeros(1, 1, 8, 8), torch.full((1, 1, 8, 8), 1e4), torch.Generator().manual_seed(0))
    assert torch.isfinite(huge).all() and huge.abs().max() < torch.exp(torch.tensor(10.0)) * 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_runs_in_half_precisions_close_to_fp32(dtype):
    reference = random_vae(TINY_VAE, seed=2)
    vae = random_vae(TINY_VAE, seed=2, dtype=dtype)
    assert all(p.dtype == dtype for p in vae.parameters())
    latents = torch.randn(1, 4, 6, 6)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents)
        encoded = vae.encode(images, sample=False)
        expected_decoded = reference.decode(latents)
        expected_encoded = reference.encode(images, sample=False)
    assert decoded.dtype == dtype and encoded.dtype == dtype
    tolerance = 2e-2 if dtype == torch.float16 else 8e-2  # bf16 keeps 8 mantissa bits
    assert relative_error(decoded, expected_decoded) < tolerance
    assert relative_error(encoded, expected_encoded) < tolerance


def test_decode_does_not_mutate_or_clamp():
    vae = random_vae(TINY_VAE, seed=4)
    latents = 10.0 * torch.randn(1, 4, 4, 4)
    before = latents.clone()
    with torch.no_grad():
        images = vae.decode(latents)
    torch.testing.assert_close(latents, before, rtol=0, atol=0)
    assert images.abs().max() > 1.0  # large random latents leave [-1, 1]: nothing clamps


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 4, 32, 32), r"\[B, 3, H, W\]"),
    (torch.zeros(3, 32, 32), r"\[B, 3, H, W\]"),
    (torch.zeros(1, 3, 30, 32), "multiples of 8"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
])
def test_encode_rejects_bad_images_clearly(bad, message):
    vae = random_vae(TINY_VAE)
    with pytest.raises((ValueError, TypeError), match=message):
        vae.encode(bad)


def test_decode_rejects_wrong_latent_channels():
    vae = random_vae(TINY_VAE)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\].*\(1, 16, 8, 8\)"):
        vae.decode(torch.zeros(1, 16, 8, 8))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        AutoencoderKL(VAEConfig(base_channels=48), device="meta")


@pytest.mark.heavy
def test_full_size_matches_diffusers():
    """Full-size SDXL VAE, random weights, fp32 on the CPU (about 10 s)."""
    vae = random_vae(SDXL_VAE, seed=11)
    reference = diffusers_vae(vae)
    images = torch.rand(1, 3, 128, 128) * 2 - 1
    latents = 3.0 * torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert relative_error(vae.encode(images, sample=False), reference.encode(images).latent_dist.mean) <= 1e-5
        assert relative_error(vae.decode(latents), reference.decode(latents).sample) <= 1e-5


def test_upsampling_splits_the_batch_below_the_32_bit_index_limit(monkeypatch):
    import sdxl_core.models.vae as vae_module

    x = torch.randn(5, 2, 3, 4)
    expected = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
    calls = []
    original = torch.nn.functional.interpolate

    def counting(t, **kwargs):
        calls.append(t.shape[0])
        return original(t, **kwargs)

    monkeypatch.setattr(vae_module.F, "interpolate", counting)
    monkeypatch.setattr(vae_module, "_MAX_INTERPOLATE_ELEMENTS", 2 * 2 * 3 * 4 * 4)  # two samples per call
    torch.testing.assert_close(vae_module._upsample_nearest(x), expected, rtol=0, atol=0)
    assert calls == [2, 2, 1]
