"""Loading tiny SDXL checkpoints in every supported layout: weights, config, dtype and outputs survive exactly."""

from __future__ import annotations

import logging

import pytest
import torch

from sdxl_core.checkpoints.files import read_header
from sdxl_core.checkpoints.loading import load_checkpoint, load_vae, save_checkpoint
from sdxl_core.config import TINY_BASE, TINY_REFINER
from tests._checkpoints import (
    single_file_state,
    single_thread,
    tiny_model,
    write_checkpoint,
    write_diffusers_folder,
    write_tensors,
    write_vae_file,
)

_single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def base():
    return tiny_model(TINY_BASE, seed=1)


@pytest.fixture(scope="module")
def refiner():
    return tiny_model(TINY_REFINER, seed=2)


def _assert_same_weights(expected, loaded, stored_dtype=None):
    for name, module in expected.modules().items():
        want, got = module.state_dict(), loaded.modules()[name].state_dict()
        assert want.keys() == got.keys(), name
        for key in want:
            reference = want[key].to(stored_dtype) if stored_dtype is not None else want[key]
            torch.testing.assert_close(got[key].float(), reference.float(), rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("kind", ["base", "refiner"])
@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
def test_single_file_roundtrip(kind, stored, base, refiner, tmp_path):
    model = base if kind == "base" else refiner
    path = write_checkpoint(model, tmp_path / f"{kind}.safetensors", dtype=stored)
    assert {t.dtype for k, t in read_header(path).tensors.items() if "position_ids" not in k} == {stored}
    loaded = load_checkpoint(path, dtype=torch.float32)
    assert loaded.config == model.config
    assert loaded.kind == kind and loaded.source == path and loaded.dtype == torch.float32
    assert (loaded.clip_l is None) == (kind == "refiner")
    _assert_same_weights(model, loaded, stored)


def test_published_key_set_is_written(base, refiner, tmp_path):
    # Bookkeeping keys of the published files are written, so saved files look like sd_xl_*_1.0.safetensors.
    keys = read_header(write_checkpoint(base, tmp_path / "b.safetensors")).tensors
    ids = keys["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and torch.equal(ids.read(), torch.arange(77)[None])
    assert keys["conditioner.embedders.1.model.logit_scale"].shape == ()
    assert "conditioner.embedders.0.model.logit_scale" in read_header(
        write_checkpoint(refiner, tmp_path / "r.safetensors")).tensors


def test_requested_dtypes_are_honoured(base, tmp_path):
    path = write_checkpoint(base, tmp_path / "b.safetensors", dtype=torch.float32)
    loaded = load_checkpoint(path, dtype=torch.bfloat16, vae_dtype=torch.float16, device="cpu")
    for name, module in loaded.modules().items():
        want = torch.float16 if name == "vae" else torch.bfloat16
        assert {p.dtype for p in module.parameters()} == {want}, name
        assert {p.device.type for p in module.parameters()} == {"cpu"}
        assert not any(p.requires_grad for p in module.parameters())
    assert loaded.dtype == torch.bfloat16
    default = load_checkpoint(path)  # CPU default: float32 everywhere
    assert {p.dtype for m in default.modules().values() for p in m.parameters()} == {torch.float32}


def test_loaded_networks_compute_what_the_saved_ones_did(base, tmp_path):
    loaded = load_checkpoint(write_checkpoint(base, tmp_path / "b.safetensors", dtype=torch.float32))
    unet = base.config.unet
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500.0])
    context = torch.randn(1, 77, unet.context_dim)
    y = torch.randn(1, unet.adm_in_channels)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t, context, y), base.unet(x, t, context, y), rtol=0, atol=0)
        tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
        for a, b in zip(loaded.clip_g(tokens), base.clip_g(tokens)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        images = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(loaded.vae.encode(images, sample=False), base.vae.encode(images, sample=False),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["base", "refiner"])
@pytest.mark.parametrize("shards", [1, 3])
def test_diffusers_folder(kind, shards, base, refiner, tmp_path):
    model = base if kind == "base" else refiner
    folder = write_diffusers_folder(model, tmp_path / f"sdxl-{kind}", shards=shards, dtype=torch.float16)
    if shards > 1:
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = load_checkpoint(folder, dtype=torch.float32, expect=kind)
    assert loaded.config == model.config  # head counts come from the folder's config.json files
    _assert_same_weights(model, loaded, torch.float16)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_separate_vae_replaces_the_checkpoints(layout, base, tmp_path):
    other = tiny_model(TINY_BASE, seed=7).vae
    vae_file = write_vae_file(other, tmp_path / f"vae-{layout}.safetensors", layout=layout)
    standalone = load_vae(vae_file, dtype=torch.float32)
    assert standalone.config == other.config
    loaded = load_checkpoint(write_checkpoint(base, tmp_path / "b.safetensors", dtype=torch.float32),
                             vae_path=vae_file, vae_dtype=torch.float32)
    for key, tensor in other.state_dict().items():
        torch.testing.assert_close(loaded.vae.state_dict()[key], tensor, rtol=0, atol=0)
        torch.testing.assert_close(standalone.state_dict()[key], tensor, rtol=0, atol=0)


def test_checkpoint_without_vae_needs_and_takes_a_separate_one(base, tmp_path):
    state = {k: v for k, v in single_file_state(base).items() if not k.startswith("first_stage_model.")}
    from sdxl_core.checkpoints.detect import config_hints

    path = write_tensors(tmp_path / "novae.safetensors", state, metadata=config_hints(base.config))
    from sdxl_core.checkpoints.errors import StateDictMismatchError

    with pytest.raises(StateDictMismatchError, match="has no VAE .* give a separate SDXL VAE file"):
        load_checkpoint(path)
    vae_file = write_vae_file(base.vae, tmp_path / "vae.safetensors")
    assert load_checkpoint(path, vae_path=vae_file).config == base.config


def test_bookkeeping_keys_are_tolerated_and_bad_position_ids_repaired(base, tmp_path, caplog):
    from sdxl_core.checkpoints.detect import config_hints

    state = single_file_state(base)
    # A merged checkpoint's typical defect: float, slightly shuffled position ids; logit_scale simply absent.
    ids = torch.arange(77, dtype=torch.float32)[None]
    ids[0, 5], ids[0, 6] = 6.0, 5.0
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = ids
    state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)  # left by some trainers and merge tools
    path = write_tensors(tmp_path / "merged.safetensors", state, metadata=config_hints(base.config))
    with caplog.at_level(logging.WARNING):
        loaded = load_checkpoint(path)
    assert "position_ids was not arange(77)" in caplog.text
    from sdxl_core.checkpoints.loading import inspect_checkpoint

    assert "denoiser.sigmas" in inspect_checkpoint(path)[2].ignored
    assert torch.equal(loaded.clip_l.hf_model.text_model.embeddings.position_ids.reshape(-1)
                       if hasattr(loaded.clip_l.hf_model, "text_model")
                       else loaded.clip_l.hf_model.embeddings.position_ids.reshape(-1), torch.arange(77))
    _assert_same_weights(base, loaded)


def test_save_checkpoint_casts_and_roundtrips_a_loaded_model(refiner, tmp_path):
    first = load_checkpoint(write_checkpoint(refiner, tmp_path / "a.safetensors", dtype=torch.float32))
    save_checkpoint(first, tmp_path / "b.safetensors", dtype=torch.bfloat16)
    header = read_header(tmp_path / "b.safetensors")
    assert {t.dtype for t in header.tensors.values()} == {torch.bfloat16}
    assert header.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
    second = load_checkpoint(tmp_path / "b.safetensors", dtype=torch.float32)
    _assert_same_weights(refiner, second, torch.bfloat16)
    assert not (tmp_path / "b.safetensors.partial").exists()


def test_diffusers_fp16_variant_files(refiner, tmp_path):
    folder = write_diffusers_folder(refiner, tmp_path / "variant", dtype=torch.float16)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    _assert_same_weights(refiner, load_checkpoint(folder, dtype=torch.float32), torch.float16)


def test_default_dtypes_per_device(monkeypatch):
    from sdxl_core.checkpoints.loading import default_dtype, default_vae_dtype

    assert default_dtype("cuda") == torch.float16 and default_dtype("cpu") == torch.float32
    # Never fp16 for the VAE by default: the original SDXL VAE overflows there (black images). bf16 where the card
    # has it natively, else fp32.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert default_vae_dtype("cuda:0") == torch.bfloat16 and default_vae_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_vae_dtype("cuda:0") == torch.float32
