"""Micro-conditioning: the ADM vector against diffusers and hand-computed values, ComfyUI's defaults."""

import math
from types import SimpleNamespace

import pytest
import torch

from sdxl_core.conditioning import (
    BaseMicroConditioning,
    ConditioningMismatch,
    RefinerMicroConditioning,
    adm_vector,
    check_conditioning_for,
    make_base_conditioning,
    make_refiner_conditioning,
    micro_conditioning_scalars,
    with_micro_conditioning,
)
from sdxl_core.config import SDXL_BASE, SDXL_REFINER, TINY_BASE, TINY_REFINER


def _embed_by_hand(value: float) -> list[float]:
    """ComfyUI `timestep_embedding(tensor([v]), 256)`: cos of v·f_i then sin, f_i = exp(-ln(1e4)·i/128)."""
    freqs = [math.exp(-math.log(10000.0) * i / 128) for i in range(128)]
    return [math.cos(value * f) for f in freqs] + [math.sin(value * f) for f in freqs]


def test_base_adm_vector_matches_hand_computed_values():
    pooled = torch.randn(2, 1280)
    micro = BaseMicroConditioning(original_size=(1024, 768), crop_top_left=(16, 8), target_size=(1152, 896))
    y = adm_vector(pooled, micro.scalars())
    assert y.shape == (2, 2816)
    torch.testing.assert_close(y[:, :1280], pooled)
    for slot, value in enumerate([1024, 768, 16, 8, 1152, 896]):
        expected = torch.tensor(_embed_by_hand(value), dtype=torch.float32)
        segment = y[0, 1280 + 256 * slot: 1280 + 256 * (slot + 1)]
        # fp32 arguments up to ~1e3 carry ~1e-4 rounding, so a float64 hand value agrees to about 1e-4.
        torch.testing.assert_close(segment, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(y[1, 1280:], y[0, 1280:])


def test_refiner_adm_vector_puts_aesthetic_score_last():
    pooled = torch.zeros(1, 1280)
    y = adm_vector(pooled, RefinerMicroConditioning((1024, 1024), (0, 0), 2.5).scalars())
    assert y.shape == (1, 2560)
    torch.testing.assert_close(y[0, -256:], torch.tensor(_embed_by_hand(2.5)), atol=2e-6, rtol=1e-5)


def _diffusers_adm(pipeline_cls, time_ids_args, pooled, requires_aesthetics):
    """y as diffusers builds it inside UNet2DConditionModel: add_time_proj(time_ids) flattened after text_embeds."""
    from diffusers.models.embeddings import Timesteps

    adm = 2560 if requires_aesthetics else 2816
    fake = SimpleNamespace(
        unet=SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=256),
                             add_embedding=SimpleNamespace(linear_1=SimpleNamespace(in_features=adm))),
        config=SimpleNamespace(requires_aesthetics_score=requires_aesthetics),
    )
    ids = pipeline_cls._get_add_time_ids(fake, *time_ids_args, dtype=torch.float32, text_encoder_projection_dim=1280)
    proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
    ids = ids if isinstance(ids, tuple) else (ids,)
    return [torch.cat([pooled, proj(i.flatten()).reshape(1, -1)], dim=1) for i in ids]


def test_base_adm_equals_diffusers_text_time_embedding():
    from diffusers import StableDiffusionXLPipeline

    pooled = torch.randn(1, 1280)
    (reference,) = _diffusers_adm(StableDiffusionXLPipeline, ((832, 1216), (32, 64), (896, 1152)), pooled, False)
    ours = adm_vector(pooled, BaseMicroConditioning((832, 1216), (32, 64), (896, 1152)).scalars())
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_refiner_adm_equals_diffusers_img2img_aesthetic_variant():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pooled = torch.randn(1, 1280)
    args = ((1024, 1024), (0, 0), (1024, 1024), 6.0, 2.5, (768, 512), (0, 0), (768, 512))
    positive, negative = _diffusers_adm(StableDiffusionXLImg2ImgPipeline, args, pooled, True)
    torch.testing.assert_close(adm_vector(pooled, RefinerMicroConditioning((1024, 1024), (0, 0), 6.0).scalars()),
                               positive, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(adm_vector(pooled, RefinerMicroConditioning((768, 512), (0, 0), 2.5).scalars()),
                               negative, atol=1e-6, rtol=1e-6)


def test_comfyui_defaults_fill_missing_fields_from_the_latent():
    # A conditioning without size fields (e.g. from a plain CLIPTextEncode) falls back to latent ×8, crop 0.
    assert micro_conditioning_scalars(SDXL_BASE, {}, (96, 128), negative=False) == (768, 1024, 0, 0, 768, 1024)
    assert micro_conditioning_scalars(SDXL_REFINER, {}, (128, 128), negative=False) == (1024, 1024, 0, 0, 6.0)
    assert micro_conditioning_scalars(SDXL_REFINER, {}, (128, 128), negative=True) == (1024, 1024, 0, 0, 2.5)
    options = {"width": 2048, "height": 1536, "crop_w": 4, "crop_h": 2}
    assert micro_conditioning_scalars(SDXL_BASE, options, (128, 128), False) == (1536, 2048, 2, 4, 1536, 2048)
    # An explicit aesthetic score wins on the negative side too.
    assert micro_conditioning_scalars(SDXL_REFINER, {"aesthetic_score": 3.0}, (8, 8), True)[-1] == 3.0


def test_comfyui_conditioning_format_round_trip():
    context, pooled = torch.randn(1, 77, 2048), torch.randn(1, 1280)
    cond = make_base_conditioning(context, pooled, BaseMicroConditioning((1024, 768), (0, 0), (1024, 768)))
    assert cond[0][0] is context
    assert cond[0][1] == {"pooled_output": pooled, "width": 768, "height": 1024, "crop_w": 0, "crop_h": 0,
                          "target_width": 768, "target_height": 1024}
    changed = with_micro_conditioning(cond, width=4096, height=4096)
    assert changed[0][1]["width"] == 4096 and cond[0][1]["width"] == 768  # the caller's list is untouched
    refiner = make_refiner_conditioning(torch.randn(1, 77, 1280), pooled, RefinerMicroConditioning((1024, 1024)))
    # No score given: the field stays absent so the sampler applies 6.0 / 2.5 by side, as ComfyUI does.
    assert "aesthetic_score" not in refiner[0][1] and refiner[0][1]["width"] == 1024
    scored = make_refiner_conditioning(torch.randn(1, 77, 1280), pooled, RefinerMicroConditioning((1024, 1024)), 3.0)
    assert scored[0][1]["aesthetic_score"] == 3.0
    # No sizes at all: the sampler conditions on the latent's size.
    assert set(make_base_conditioning(context, pooled)[0][1]) == {"pooled_output"}


def test_refiner_conditioning_in_the_base_is_named_as_such():
    pooled = torch.randn(1, 1280)
    refiner_cond = make_refiner_conditioning(torch.randn(1, 77, 64), pooled, RefinerMicroConditioning((64, 64)))
    with pytest.raises(ConditioningMismatch, match="refiner conditioning wired into the base"):
        check_conditioning_for(TINY_BASE, refiner_cond)
    base_cond = make_base_conditioning(torch.randn(1, 77, 96), pooled, BaseMicroConditioning((64, 64)))
    with pytest.raises(ConditioningMismatch, match="base conditioning wired into the refiner"):
        check_conditioning_for(TINY_REFINER, base_cond, role="negative")
    check_conditioning_for(TINY_BASE, base_cond)


def test_unsupported_options_and_missing_pooled_are_refused():
    context = torch.randn(1, 77, 96)
    with pytest.raises(ConditioningMismatch, match="pooled_output"):
        check_conditioning_for(TINY_BASE, [[context, {}]])
    with pytest.raises(ConditioningMismatch, match="gligen"):
        check_conditioning_for(TINY_BASE, [[context, {"pooled_output": torch.zeros(1, 1280), "gligen": ("position",)}]])
    with pytest.raises(ConditioningMismatch, match="empty"):
        check_conditioning_for(TINY_BASE, [])


def test_timestep_ranges_and_strengths_are_accepted_within_comfyuis_bounds():
    """ConditioningSetTimestepRange and ConditioningSetAreaStrength write these fields; the sampler applies them
    (guidance.WeightedConditioning), so only values ComfyUI's own widgets cannot produce are refused."""
    context, pooled = torch.randn(1, 77, 96), torch.zeros(1, 1280)
    for fields in ({"start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}, {"start_percent": 0.2},
                   {"end_percent": 0.8, "strength": 0.0}, {"start_percent": 0.5, "end_percent": 0.5}):
        check_conditioning_for(TINY_BASE, [[context, {"pooled_output": pooled, **fields}]])
    for fields in ({"start_percent": 0.6, "end_percent": 0.4}, {"start_percent": -0.1}, {"end_percent": 1.5}):
        with pytest.raises(ConditioningMismatch, match="timestep range"):
            check_conditioning_for(TINY_BASE, [[context, {"pooled_output": pooled, **fields}]])
    for strength in (-1.0, float("nan"), "1"):
        with pytest.raises(ConditioningMismatch, match="strength"):
            check_conditioning_for(TINY_BASE, [[context, {"pooled_output": pooled}],
                                               [context, {"pooled_output": pooled, "strength": strength}]],
                                   role="negative")


def test_an_explicit_prompt_type_decides_the_default_aesthetic_score():
    """ComfyUI `samplers.encode_model_conds` keeps a conditioning's own `prompt_type` over the side it is wired
    to, and `SDXLRefiner.encode_adm` picks the default score (6 / 2.5) from it."""
    pooled = torch.zeros(1, 1280)
    marked_negative = {"pooled_output": pooled, "prompt_type": "negative"}
    assert micro_conditioning_scalars(TINY_REFINER, marked_negative, (8, 8), negative=False)[-1] == 2.5
    marked_positive = {"pooled_output": pooled, "prompt_type": "positive"}
    assert micro_conditioning_scalars(TINY_REFINER, marked_positive, (8, 8), negative=True)[-1] == 6.0
    assert micro_conditioning_scalars(TINY_REFINER, {"pooled_output": pooled}, (8, 8), negative=True)[-1] == 2.5


def test_legacy_apply_controlnet_flag_is_refused_with_a_sentence():
    context = torch.randn(1, 77, 96)
    options = {"pooled_output": torch.zeros(1, 1280), "control_apply_to_uncond": True}
    with pytest.raises(ConditioningMismatch, match=r"legacy Apply ControlNet.*Apply ControlNet \(Advanced\)"):
        check_conditioning_for(TINY_BASE, [[context, options]])
    check_conditioning_for(TINY_BASE, [[context, {**options, "control_apply_to_uncond": False}]])
