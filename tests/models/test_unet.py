"""UNet: checkpoint layout against the published manifests, and output parity with diffusers on random weights."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sdxl_core.config import (
    ADM_SCALAR_EMBED_DIM,
    SDXL_BASE_UNET,
    SDXL_REFINER_UNET,
    TINY_BASE_UNET,
    TINY_REFINER_UNET,
    UNetConfig,
)
from sdxl_core.models.timestep_embedding import timestep_embedding
from sdxl_core.models.unet import UNetModel
from tests._diffusers_twins import diffusers_unet

MANIFESTS = Path(__file__).resolve().parents[1] / "data" / "manifests"
UNET_PREFIX = "model.diffusion_model."
POOLED_DIM = 1280  # bigG projection width, the head of every SDXL y vector
# Parameter counts from docs/architecture.md#unet (computed from the sgm configs).
FULL_PARAMS = {"base": 2_567_463_684, "refiner": 2_259_526_660}
FULL = {"base": SDXL_BASE_UNET, "refiner": SDXL_REFINER_UNET}
TINY = {"base": TINY_BASE_UNET, "refiner": TINY_REFINER_UNET}


# ----------------------------------------------------------------------------------------------- helpers


def randomize_(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter with random values of a sensible scale (the default init zeroes some projections)."""
    gen = torch.Generator().manual_seed(seed)
    filled = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            with torch.no_grad():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                    value = 1.0 + 0.2 * noise if name == "weight" else 0.2 * noise
                elif name == "weight":
                    value = noise / math.sqrt(param[0].numel())  # unit-variance outputs for unit-variance inputs
                else:
                    value = 0.1 * noise
                param.copy_(value.to(param.dtype))
            filled.add(id(param))
    assert filled == {id(p) for p in model.parameters()}


def manifest_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    manifest = json.loads((MANIFESTS / f"sdxl_{kind}_manifest.json").read_text())
    return {k[len(UNET_PREFIX):]: tuple(v["shape"]) for k, v in manifest.items() if k.startswith(UNET_PREFIX)}


def random_inputs(config: UNetConfig, batch: int, height: int, width: int, seed: int = 1):
    """x, timesteps, context, pooled and raw micro-conditioning scalars, plus y built from them as sgm does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, height, width, generator=gen)
    timesteps = torch.tensor([999.0, 1.0, 500.5, 0.0][:batch])
    context = torch.randn(batch, 77, config.context_dim, generator=gen)
    pooled = torch.randn(batch, POOLED_DIM, generator=gen)
    n_scalars = (config.adm_in_channels - POOLED_DIM) // ADM_SCALAR_EMBED_DIM
    time_ids = torch.randint(0, 2048, (batch, n_scalars), generator=gen).float()
    y = torch.cat([pooled, timestep_embedding(time_ids.flatten(), ADM_SCALAR_EMBED_DIM).reshape(batch, -1)], dim=1)
    return x, timesteps, context, y, pooled, time_ids


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def assert_diffusers_parity(config: UNetConfig, height: int, width: int, batch: int = 2,
                            share_memory: bool = False) -> None:
    pytest.importorskip("diffusers.loaders.single_file_utils")
    unet = UNetModel(config, device="meta").to_empty(device="cpu")  # randomize_ overwrites every parameter
    randomize_(unet)
    unet.eval()
    twin = diffusers_unet(unet, share_memory=share_memory)
    x, timesteps, context, y, pooled, time_ids = random_inputs(config, batch, height, width)
    with torch.inference_mode():
        ours = unet(x, timesteps, context, y)
        ref = twin(x, timesteps, encoder_hidden_states=context,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert ours.shape == ref.shape == x.shape
    assert ref.abs().max() > 1e-2  # the weights are random, not zero: the comparison can fail
    err = relative_error(ours, ref)
    assert err <= 1e-5, f"relative error {err:.3g} against diffusers"


# ----------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_layout_matches_manifest(kind):
    unet = UNetModel(FULL[kind], device="meta")
    ours = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ref = manifest_shapes(kind)
    assert sorted(set(ref) - set(ours)) == [], "keys in the checkpoint that the model lacks"
    assert sorted(set(ours) - set(ref)) == [], "keys in the model that the checkpoint lacks"
    mismatched = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert mismatched == {}
    assert sum(p.numel() for p in unet.parameters()) == FULL_PARAMS[kind]
    assert all(p.is_meta for p in unet.parameters())


def test_refiner_upsample_position():
    keys = UNetModel(SDXL_REFINER_UNET, device="meta").state_dict().keys()
    assert "output_blocks.2.1.conv.weight" in keys  # no attention in the refiner's deepest level
    assert "output_blocks.5.2.conv.weight" in keys and "output_blocks.8.2.conv.weight" in keys
    assert not any(k.startswith("output_blocks.11.") and ".conv." in k for k in keys)


def test_from_state_dict_assigns_without_copy_and_casts():
    source = UNetModel(TINY_BASE_UNET)
    randomize_(source)
    state = source.state_dict()
    adopted = UNetModel.from_state_dict(TINY_BASE_UNET, state)
    assert adopted.out[2].weight.data_ptr() == state["out.2.weight"].data_ptr()
    assert not any(p.is_meta for p in adopted.parameters())
    cast = UNetModel.from_state_dict(TINY_BASE_UNET, state, dtype=torch.bfloat16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}


def test_from_state_dict_is_strict():
    state = UNetModel(TINY_REFINER_UNET).state_dict()
    missing = {k: v for k, v in state.items() if k != "label_emb.0.0.weight"}
    with pytest.raises(RuntimeError, match="label_emb.0.0.weight"):
        UNetModel.from_state_dict(TINY_REFINER_UNET, missing)
    misshaped = dict(state, **{"out.2.bias": torch.zeros(5)})
    with pytest.raises(RuntimeError, match="out.2.bias"):
        UNetModel.from_state_dict(TINY_REFINER_UNET, misshaped)


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_tiny_parity_with_diffusers(kind):
    assert_diffusers_parity(TINY[kind], 16, 16)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_tiny_parity_with_diffusers_odd_latent(kind):
    # 72x104 px -> 9x13 latent: not a multiple of 2**(levels-1), so every upsample must follow its skip's size.
    assert_diffusers_parity(TINY[kind], 9, 13)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_full_size_parity_with_diffusers(kind):
    assert_diffusers_parity(FULL[kind], 32, 32, batch=1, share_memory=True)


# ----------------------------------------------------------------------------------------------- dtypes, inputs


def _fp16_supported_on_cpu() -> bool:
    try:
        conv = nn.Conv2d(32, 32, 3, dtype=torch.float16)
        norm = nn.GroupNorm(8, 32, dtype=torch.float16)
        norm(conv(torch.zeros(1, 32, 4, 4, dtype=torch.float16)))
        q = torch.zeros(1, 1, 2, 8, dtype=torch.float16)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [
    torch.bfloat16,
    pytest.param(torch.float16, marks=pytest.mark.skipif(not _fp16_supported_on_cpu(),
                                                          reason="this torch build lacks fp16 CPU kernels")),
])
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_half_precision_forward(kind, dtype):
    config = TINY[kind]
    reference = UNetModel(config)
    randomize_(reference)
    half = UNetModel.from_state_dict(config, reference.state_dict(), dtype=dtype)
    x, timesteps, context, y, *_ = random_inputs(config, 2, 9, 13)
    with torch.inference_mode():
        expected = reference(x, timesteps, context, y)
        same_dtype = half(x.to(dtype), timesteps, context.to(dtype), y.to(dtype))
        fp32_io = half(x, timesteps, context, y)
    assert same_dtype.dtype == dtype and fp32_io.dtype == torch.float32
    assert torch.isfinite(same_dtype).all() and torch.isfinite(fp32_io).all()
    assert relative_error(fp32_io, expected) < 0.06  # observed ~0.02 (bf16), ~0.002 (fp16): same function


def test_forward_leaves_inputs_untouched_and_is_deterministic():
    unet = UNetModel(TINY_REFINER_UNET)
    randomize_(unet)
    inputs = random_inputs(TINY_REFINER_UNET, 2, 8, 8)[:4]
    copies = [t.clone() for t in inputs]
    with torch.inference_mode():
        first = unet(*inputs)
        second = unet(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))
    assert torch.equal(first, second)
    # Integer timesteps are accepted and mean the same as their float values.
    with torch.inference_mode():
        as_int = unet(inputs[0], torch.tensor([999, 1]), *inputs[2:])
        as_float = unet(inputs[0], torch.tensor([999.0, 1.0]), *inputs[2:])
    assert torch.equal(as_int, as_float)


@pytest.mark.parametrize("which, shape, message", [
    ("x", (2, 3, 8, 8), "x must be"),
    ("timesteps", (3,), "timesteps must be"),
    ("context", (2, 77, 32), "context must be"),
    ("y", (2, 2816), "y .* must be"),
])
def test_rejects_mis_shaped_inputs(which, shape, message):
    unet = UNetModel(TINY_REFINER_UNET)
    names = ("x", "timesteps", "context", "y")
    inputs = dict(zip(names, random_inputs(TINY_REFINER_UNET, 2, 8, 8)[:4]))
    inputs[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=message):
        unet(**inputs)


def test_meta_model_refuses_to_run():
    unet = UNetModel(TINY_REFINER_UNET, device="meta")
    with pytest.raises(RuntimeError, match="meta device"):
        unet(*random_inputs(TINY_REFINER_UNET, 1, 8, 8)[:4])
