"""The two-stage pipeline on tiny models: handoff semantics, determinism, validation, cancellation."""

import pytest
import torch

from sdxl_core.conditioning import BaseMicroConditioning, ConditioningMismatch, RefinerMicroConditioning
from sdxl_core.pipeline import (
    GenerationRequest,
    decode,
    empty_latent,
    encode,
    encode_base_conditioning,
    encode_refiner_conditioning,
    generate,
)
from sdxl_core.runtime.residency import ResidencyPlan
from sdxl_core.sampling.ksampler import guided_denoiser, sample_latent
from sdxl_core.sampling.model_sampling import model_sampling_for
from sdxl_core.sampling.samplers import SamplingCancelled
from sdxl_core.sampling.settings import SamplingSettings
from tests._host_reads import HostReads

SIZE = 64  # pixels: an 8x8 latent keeps every UNet call in milliseconds


@pytest.fixture(scope="module")
def base_conds(tiny_base):
    positive = encode_base_conditioning(tiny_base, "a red cube", micro=BaseMicroConditioning((SIZE, SIZE)))
    negative = encode_base_conditioning(tiny_base, "blurry", micro=BaseMicroConditioning((SIZE, SIZE)))
    return positive, negative


SETTINGS = ("seed", "steps", "cfg", "sampler", "scheduler", "denoise")


def _sample(model, latent, conds, **overrides):
    settings = dict(seed=7, steps=6, cfg=4.0, sampler="euler", scheduler="normal")
    settings.update((k, v) for k, v in overrides.items() if k in SETTINGS)
    step_range = {k: v for k, v in overrides.items() if k not in SETTINGS}
    return sample_latent(model, latent, *conds, SamplingSettings(**settings), **step_range)


def test_split_run_with_leftover_noise_equals_one_run(tiny_base, base_conds):
    """KSamplerAdvanced handoff: [0, K) with leftover noise, then [K, N) without added noise == [0, N)."""
    latent = empty_latent(SIZE, SIZE)
    whole = _sample(tiny_base, latent, base_conds)
    first = _sample(tiny_base, latent, base_conds, end_step=4, return_with_leftover_noise=True)
    second = _sample(tiny_base, first, base_conds, start_step=4, add_noise=False)
    torch.testing.assert_close(second["samples"], whole["samples"], rtol=1e-5, atol=1e-5)
    # Without leftover noise the first part is forced to sigma 0 and so differs from the handoff latent.
    forced = _sample(tiny_base, latent, base_conds, end_step=4)
    assert not torch.allclose(forced["samples"], first["samples"])


def test_same_seed_same_bits_and_other_seed_differs(tiny_base, base_conds):
    latent = empty_latent(SIZE, SIZE)
    a = _sample(tiny_base, latent, base_conds, sampler="euler_ancestral")
    b = _sample(tiny_base, latent, base_conds, sampler="euler_ancestral")
    c = _sample(tiny_base, latent, base_conds, sampler="euler_ancestral", seed=8)
    assert torch.equal(a["samples"], b["samples"])
    assert not torch.equal(a["samples"], c["samples"])


def test_start_noise_is_comfyuis_cpu_draw(tiny_base, base_conds, monkeypatch):
    """The first UNet input is randn(seed) · sqrt(1 + sigma_max²) · c_in, as ComfyUI's KSampler makes it."""
    seen = {}
    real_forward = tiny_base.unet.forward

    def spy(x, t, context, y):
        seen.setdefault("x", x.clone())
        return real_forward(x, t, context, y)

    monkeypatch.setattr(tiny_base.unet, "forward", spy)
    _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, steps=1)
    torch.manual_seed(7)
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8)
    sigma_max = 14.614641
    expected = noise * (1 + sigma_max**2) ** 0.5 / (sigma_max**2 + 1) ** 0.5
    torch.testing.assert_close(seen["x"][:1], expected, rtol=1e-5, atol=1e-5)


def test_denoise_zero_and_empty_range_return_the_latent_unchanged(tiny_base, base_conds):
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    assert torch.equal(_sample(tiny_base, latent, base_conds, denoise=0.0)["samples"], latent["samples"])
    assert torch.equal(_sample(tiny_base, latent, base_conds, start_step=6)["samples"], latent["samples"])
    partial = _sample(tiny_base, latent, base_conds, denoise=0.3)
    assert not torch.equal(partial["samples"], latent["samples"])


def test_refiner_conditioning_in_base_sampler_is_a_sentence(tiny_base, tiny_refiner, base_conds):
    refiner_cond = encode_refiner_conditioning(tiny_refiner, "a red cube", micro=RefinerMicroConditioning((SIZE, SIZE)))
    with pytest.raises(ConditioningMismatch, match="refiner conditioning wired into the base"):
        _sample(tiny_base, empty_latent(SIZE, SIZE), (refiner_cond, base_conds[1]))
    with pytest.raises(ConditioningMismatch, match="base conditioning wired into the refiner"):
        _sample(tiny_refiner, empty_latent(SIZE, SIZE), (base_conds[0], refiner_cond))
    with pytest.raises(ValueError, match="needs the SDXL base"):
        encode_base_conditioning(tiny_refiner, "x")


def test_bad_latents_and_ranges_are_refused(tiny_base, base_conds):
    with pytest.raises(ValueError, match="multiple of 8"):
        empty_latent(100, 64)
    with pytest.raises(ValueError, match="NaN"):
        _sample(tiny_base, {"samples": torch.full((1, 4, 8, 8), float("nan"))}, base_conds)
    with pytest.raises(ValueError, match=r"\[batch, 4"):
        _sample(tiny_base, {"samples": torch.zeros(1, 16, 8, 8)}, base_conds)
    with pytest.raises(ValueError, match="must come before"):
        _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, start_step=5, end_step=3)
    with pytest.raises(ValueError, match="refiner start step"):
        GenerationRequest(prompt="x", steps=10, refiner_start=12)
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerationRequest(prompt="x", width=1001)


def test_cancel_stops_between_steps(tiny_base, base_conds):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(SamplingCancelled):
        _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, cancel=cancel)
    assert len(calls) == 3


def test_generate_two_stage_reports_each_step_and_decodes(tiny_base, tiny_refiner):
    stages = []
    request = GenerationRequest(prompt="a red cube", negative="blurry", width=SIZE, height=SIZE + 16, steps=5,
                                refiner_start=3, cfg=3.0)
    result = generate(tiny_base, tiny_refiner, request, on_step=stages.append)
    assert stages == ["base"] * 3 + ["refiner"] * 2
    assert result.images.shape == (1, SIZE + 16, SIZE, 3)
    assert result.images.min() >= 0 and result.images.max() <= 1
    assert result.parameters["refiner_start"] == 3
    # The base alone runs all steps.
    stages.clear()
    generate(tiny_base, None, request, on_step=stages.append)
    assert stages == ["base"] * 5


def test_vae_round_trip_through_comfy_formats(tiny_base):
    image = torch.rand(1, SIZE, SIZE, 3)
    latent = encode(tiny_base, image, seed=0)
    assert latent["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    decoded = decode(tiny_base, latent)
    assert decoded.shape == image.shape and decoded.dtype == torch.float32
    with pytest.raises(ValueError, match="multiples of 8"):
        encode(tiny_base, torch.rand(1, 60, 64, 3))


def test_generate_under_a_residency_plan_changes_nothing(tiny_base, tiny_refiner):
    request = GenerationRequest(prompt="a lighthouse", negative="blurry", width=64, height=64, steps=4,
                                refiner_start=3, cfg=5.0, seed=7)
    plain = generate(tiny_base, tiny_refiner, request)
    sizes = {name: sum(p.numel() * p.element_size() for p in module.parameters())
             for name, module in tiny_base.modules().items()}
    plan = ResidencyPlan("cpu", sizes["unet"] + sizes["vae"])  # one UNet + VAE: the 8 GB shape in miniature
    planned = generate(tiny_base, tiny_refiner, request, residency=plan)
    assert torch.equal(plain.images, planned.images)
    assert [e.name for e in plan.events if e.action == "load"] == [
        "base.clip_l", "base.clip_g", "base.unet", "refiner.clip_g", "refiner.unet", "base.vae"]


def test_refiner_conditions_on_the_output_size_whatever_the_base_was_told(tiny_base, tiny_refiner, monkeypatch):
    """sgm's `apply_refiner` (and diffusers' refiner defaults) condition the refiner on the latent's size with crop
    (0, 0); a base-only original size or crop (e.g. 4096² for a 'high-resolution' look) must not leak into it."""
    import sdxl_core.pipeline as pipeline

    seen = []
    real = pipeline.encode_refiner_conditioning

    def spy(model, text, **kwargs):
        seen.append(kwargs)
        return real(model, text, **kwargs)

    monkeypatch.setattr(pipeline, "encode_refiner_conditioning", spy)
    request = GenerationRequest(prompt="a red cube", width=SIZE, height=SIZE + 16, steps=3, refiner_start=2,
                                original_size=(4096, 2048), crop_top_left=(8, 16), target_size=(SIZE + 16, SIZE))
    generate(tiny_base, tiny_refiner, request)
    assert len(seen) == 2
    for kwargs in seen:
        assert kwargs["micro"].original_size == (SIZE + 16, SIZE)
        assert kwargs["micro"].crop_top_left == (0, 0)


def test_an_explicit_grid_and_a_denoise_strength_are_not_both_taken(tiny_base, base_conds):
    """`sigmas` replaces the scheduler's grid, and `denoise` only shapes that grid: given both, the strength would
    be dropped without a word."""
    sigmas = torch.tensor([14.6146, 3.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="denoise"):
        _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, sigmas=sigmas, denoise=0.5)
    out = _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, sigmas=sigmas)
    assert torch.isfinite(out["samples"]).all()


def test_encode_without_a_seed_is_comfyuis_deterministic_posterior_mean(tiny_base):
    """ComfyUI's VAEEncode returns the posterior mode (its DiagonalGaussianRegularizer defaults to sample=False
    since Comfy-Org/ComfyUI#8705); a seed asks for an sgm/diffusers-style posterior sample instead. Without a
    seed nothing may come from the global RNG."""
    from sdxl_core.runtime.vae_decoding import comfy_to_images, encode_images

    image = torch.rand(1, SIZE, SIZE, 3)
    first = encode(tiny_base, image)["samples"]
    torch.manual_seed(123)
    second = encode(tiny_base, image)["samples"]
    assert torch.equal(first, second)
    mean = encode_images(tiny_base.vae, comfy_to_images(image), sample=False).float().cpu()
    torch.testing.assert_close(first, mean)
    seeded = encode(tiny_base, image, seed=5)["samples"]
    assert torch.equal(seeded, encode(tiny_base, image, seed=5)["samples"]) and not torch.equal(seeded, mean)


def test_non_finite_conditioning_is_named_before_sampling(tiny_base, base_conds):
    """A NaN in the text embeddings (e.g. a "(word:nan)" weight, or an fp16 text encoder overflowing) would only
    surface after the last step as non-finite latents, blamed on the UNet's dtype; say where it comes from."""
    positive, negative = base_conds
    context, options = positive[0]
    broken = [[context.clone().index_fill_(1, torch.tensor([3]), float("nan")), options]]
    calls = []
    real_forward = tiny_base.unet.forward
    with pytest.raises(ConditioningMismatch, match="positive conditioning.*NaN"):
        try:
            tiny_base.unet.forward = lambda *a, **k: calls.append(1) or real_forward(*a, **k)
            _sample(tiny_base, empty_latent(SIZE, SIZE), (broken, negative))
        finally:
            del tiny_base.unet.forward
    assert not calls
    broken_pooled = [[context, {**options, "pooled_output": torch.full_like(options["pooled_output"], float("inf"))}]]
    with pytest.raises(ConditioningMismatch, match="negative conditioning.*pooled"):
        _sample(tiny_base, empty_latent(SIZE, SIZE), (positive, broken_pooled))


def test_combined_conditioning_is_the_strength_weighted_mean_in_one_unet_call(tiny_base, base_conds, monkeypatch):
    """ComfyUI ConditioningCombine with strengths 1 and 3: each side's x0 is (1·x0_a + 3·x0_b) / 4, so the guided
    x0 is the same mean of the two single-entry guided x0s; both entries and the negative share one UNet call."""
    positive, negative = base_conds
    other = encode_base_conditioning(tiny_base, "a blue sphere, studio light",
                                     micro=BaseMicroConditioning((SIZE, SIZE // 2)))
    (context_a, options_a), (context_b, options_b) = positive[0], other[0]
    combined = [[context_a, options_a], [context_b, {**options_b, "strength": 3.0}]]
    x, sigma = torch.randn(1, 4, 8, 8) * 3.0, torch.tensor([3.0])
    calls = []
    real_forward = tiny_base.unet.forward

    def spy(x_in, t, context, y):
        calls.append(x_in.shape[0])
        return real_forward(x_in, t, context, y)

    with torch.inference_mode():
        single_a = guided_denoiser(tiny_base, positive, negative, 4.0, (8, 8))(x, sigma)
        single_b = guided_denoiser(tiny_base, other, negative, 4.0, (8, 8))(x, sigma)
        monkeypatch.setattr(tiny_base.unet, "forward", spy)
        both = guided_denoiser(tiny_base, combined, negative, 4.0, (8, 8))(x, sigma)
    assert calls == [3]
    torch.testing.assert_close(both, (1.0 * single_a + 3.0 * single_b) / 4.0, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both, single_a, atol=1e-3) and not torch.allclose(both, single_b, atol=1e-3)


def test_a_timestep_range_limits_an_entry_to_its_part_of_the_schedule(tiny_base, base_conds):
    """ConditioningSetTimestepRange: an entry counts only where sigma lies within percent_to_sigma(start..end)."""
    positive, negative = base_conds
    other = encode_base_conditioning(tiny_base, "a blue sphere", micro=BaseMicroConditioning((SIZE, SIZE)))
    split = [[positive[0][0], {**positive[0][1], "end_percent": 0.5}],
             [other[0][0], {**other[0][1], "start_percent": 0.5}]]
    boundary = model_sampling_for(tiny_base.config).schedule.percent_to_sigma(0.5)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        gated = guided_denoiser(tiny_base, split, negative, 4.0, (8, 8))
        for sigma, alone in ((boundary * 4, positive), (boundary / 4, other)):
            s = torch.tensor([sigma])
            expected = guided_denoiser(tiny_base, alone, negative, 4.0, (8, 8))(x, s)
            assert torch.equal(gated(x, s), expected)
    out = _sample(tiny_base, empty_latent(SIZE, SIZE), (split, negative))
    assert torch.isfinite(out["samples"]).all()
    assert not torch.equal(out["samples"], _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds)["samples"])


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_a_guided_stage_reads_nothing_back_per_step(tiny_base, base_conds, sampler):
    """Conditioning, guidance, the UNet and the sampler loop together: the values read back into Python (each a
    GPU stall) are the same for 4 and 9 steps, so none happens per step."""
    counts = []
    for steps in (4, 9):
        with HostReads() as reads:
            _sample(tiny_base, empty_latent(SIZE, SIZE), base_conds, steps=steps, sampler=sampler,
                    scheduler="karras")
        counts.append(reads.count)
    assert counts[0] == counts[1], f"{counts[0]} host reads for 4 steps, {counts[1]} for 9"


def test_image_to_image_checks_its_inputs(tiny_base):
    from sdxl_core.pipeline import ImageToImageRequest, image_to_image

    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
        ImageToImageRequest(prompt="x", strength=0.0)
    with pytest.raises(ValueError, match="unknown scheduler"):
        ImageToImageRequest(prompt="x", scheduler="fast")
    request = ImageToImageRequest(prompt="a red cube", steps=2)
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\] tensor"):
        image_to_image(tiny_base, torch.rand(1, 3, SIZE, SIZE), request)
    with pytest.raises(ValueError, match="multiple of 8"):
        image_to_image(tiny_base, torch.rand(1, SIZE, SIZE + 4, 3), request)
    with pytest.raises(ValueError, match="aesthetic scores condition only the SDXL refiner"):
        image_to_image(tiny_base, torch.rand(1, SIZE, SIZE, 3), ImageToImageRequest(prompt="x", aesthetic_score=9))
    image = torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(2))
    result = image_to_image(tiny_base, image, request)
    assert result.images.shape == image.shape and result.parameters["strength"] == 0.3


def test_refiner_image_to_image_refuses_a_clip_l_prompt(tiny_refiner):
    from sdxl_core.pipeline import ImageToImageRequest, image_to_image

    with pytest.raises(ValueError, match="the SDXL refiner has only the OpenCLIP bigG encoder"):
        image_to_image(tiny_refiner, torch.rand(1, SIZE, SIZE, 3), ImageToImageRequest(prompt="x", prompt_l="y"))
