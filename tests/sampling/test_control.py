"""ControlNet in sampling: Apply ControlNet (Advanced) semantics, and parity with diffusers'
StableDiffusionXLControlNetPipeline on tiny weights where the two conventions coincide (the whole schedule)."""

import pytest
import torch

from sdxl_core.conditioning import BaseMicroConditioning
from sdxl_core.models.unet import ControlResiduals
from sdxl_core.pipeline import encode_base_conditioning
from sdxl_core.sampling.control import ControlNetApplication, apply_controlnet, broadcast_hint, resize_hint
from sdxl_core.sampling.ksampler import denoise_from
from sdxl_core.sampling.schedules import DiscreteSchedule
from tests._diffusers_reference import diffusers_clip_tokenizers, euler_scheduler, relative_error
from tests._diffusers_twins import diffusers_controlnet, diffusers_unet, diffusers_vae
from tests._sampling_helpers import sample_with
from tests.models.test_controlnet import random_controlnet

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE, STEPS, CFG, SEED, STRENGTH = 64, 8, 5.0, 7, 0.7
PROMPT, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry, low quality"


@pytest.fixture(scope="module")
def controlnet():
    return random_controlnet()


@pytest.fixture(scope="module")
def conditioning(tiny_base):
    micro = BaseMicroConditioning(original_size=(SIZE, SIZE))
    return (encode_base_conditioning(tiny_base, PROMPT, micro=micro),
            encode_base_conditioning(tiny_base, NEGATIVE, micro=micro))


def control_image(height=SIZE, width=SIZE, batch=1, seed=4):
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


class NetworkCalls:
    """Counts the ControlNet's forward calls and the batch each saw."""

    def __init__(self, network):
        self.batches = []
        self.handle = network.register_forward_pre_hook(lambda _m, args: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_matches_diffusers_controlnet_pipeline(tiny_base, controlnet, conditioning, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    tokenizer, tokenizer_2 = diffusers_clip_tokenizers(tmp_path)
    scheduler = euler_scheduler()
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        vae=diffusers_vae(tiny_base.vae), text_encoder=tiny_base.clip_l.hf_model,
        text_encoder_2=tiny_base.clip_g.hf_model, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=diffusers_unet(tiny_base.unet), controlnet=diffusers_controlnet(controlnet), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    image = control_image()
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        reference = pipe(PROMPT, negative_prompt=NEGATIVE, image=image.movedim(-1, 1), height=SIZE, width=SIZE,
                         num_inference_steps=STEPS, guidance_scale=CFG, controlnet_conditioning_scale=STRENGTH,
                         latents=noise.clone(), output_type="latent").images
    sigmas = scheduler.sigmas  # the same float32 grid (see tests/test_pipeline_parity.py)
    x = noise * (sigmas[0] ** 2 + 1) ** 0.5
    positive, negative = apply_controlnet(*conditioning, controlnet, image, STRENGTH)
    with NetworkCalls(controlnet) as calls:
        ours = denoise_from(tiny_base, x, sigmas, positive, negative, cfg=CFG, sampler="euler")
    plain = denoise_from(tiny_base, x, sigmas, *conditioning, cfg=CFG, sampler="euler")
    assert calls.batches == [2] * STEPS  # one ControlNet call per step, on the batched [uncond; cond]
    assert relative_error(plain, reference) > 100 * 1e-4  # the ControlNet changed the result, beyond tolerance
    assert relative_error(ours, reference) <= 1e-4


def test_schedule_range_gates_by_sigma(tiny_base, controlnet, conditioning):
    """The ControlNet runs exactly at the steps whose sigma lies in [sigma(end), sigma(start)] (ComfyUI
    `pre_run` + `get_control`), and the other steps are the plain model's."""
    start, end = 0.2, 0.6
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    positive, negative = apply_controlnet(*conditioning, controlnet, control_image(), 1.0, start, end)
    settings = dict(seed=SEED, steps=STEPS, cfg=CFG, sampler="euler", scheduler="normal")
    seen = []
    with NetworkCalls(controlnet) as calls:
        out = sample_with(tiny_base, latent, positive, negative, **settings,
                            callback=lambda info: seen.append(float(info["sigma"])))
    schedule = DiscreteSchedule()
    sigma_start, sigma_end = schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)
    expected = sum(sigma_end <= s <= sigma_start for s in seen)
    assert 0 < expected < STEPS
    assert len(calls.batches) == expected
    plain = sample_with(tiny_base, latent, *conditioning, **settings)
    assert not torch.allclose(out["samples"], plain["samples"])


def test_apply_shares_one_application_and_chains(controlnet, conditioning):
    positive, negative = apply_controlnet(*conditioning, controlnet, control_image(), 0.5)
    first = positive[0][1]["control"]
    assert negative[0][1]["control"] is first and first.previous is None
    positive2, negative2 = apply_controlnet(positive, negative, controlnet, control_image(seed=5), 0.8, 0.1, 0.9)
    second = positive2[0][1]["control"]
    assert negative2[0][1]["control"] is second and second.previous is first
    assert [link.strength for link in second.chain()] == [0.5, 0.8]
    assert "control" not in conditioning[0][0][1]  # the inputs are left alone
    assert apply_controlnet(*conditioning, controlnet, control_image(), 0.0) == conditioning


def test_chain_sums_scaled_residuals(controlnet):
    from sdxl_core.config import TINY_BASE_UNET
    from sdxl_core.sampling.control import ControlSchedule
    from tests.models.test_unet import random_inputs

    image_a, image_b = control_image(seed=1), control_image(seed=2)
    chain = ControlNetApplication(controlnet, image_b, 0.3, previous=ControlNetApplication(controlnet, image_a, 2.0))
    x, t, context, y, _, _ = random_inputs(TINY_BASE_UNET, 1, 8, 8)
    with torch.inference_mode():
        summed = ControlSchedule(chain, DiscreteSchedule().percent_to_sigma).at(5.0, 1)(x, t, context, y)
        a = controlnet(x, t, context, y, image_a.movedim(-1, 1))
        b = controlnet(x, t, context, y, image_b.movedim(-1, 1))
    expected = ControlResiduals.summed([a.scaled(2.0), b.scaled(0.3)])
    for ours, theirs in zip(summed.skips + (summed.middle,), expected.skips + (expected.middle,)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_hint_is_centre_cropped_then_resized():
    image = torch.arange(2 * 12 * 4, dtype=torch.float32).reshape(1, 2, 12, 4)
    out = resize_hint(image, 4, 4)  # 12x4 -> crop rows 4..8 -> 4x4, unchanged by the resize
    assert torch.equal(out, image[..., 4:8, :])
    assert resize_hint(image, 24, 8).shape == (1, 2, 24, 8)


def test_hint_batch_follows_comfyui():
    hints = torch.arange(3.0).reshape(3, 1, 1, 1)
    assert torch.equal(broadcast_hint(hints[:1], 4, 2), hints[:1])
    # 2 chunks of 2 latents from 3 images: each chunk takes the first two
    assert broadcast_hint(hints, 4, 2).flatten().tolist() == [0, 1, 0, 1]
    # 2 chunks of 5 latents from 3 images: cycled
    assert broadcast_hint(hints, 10, 2).flatten().tolist() == [0, 1, 2, 0, 1] * 2


def test_bad_control_input_is_refused_before_sampling(tiny_base, tiny_refiner, controlnet, conditioning):
    with pytest.raises(ValueError, match=r"IMAGE \[batch, height, width, 3\]"):
        ControlNetApplication(controlnet, torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="0 <= start_percent <= end_percent <= 1"):
        apply_controlnet(*conditioning, controlnet, control_image(), 1.0, 0.8, 0.2)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    foreign = [[conditioning[0][0][0], {**conditioning[0][0][1], "control": object()}]]
    with pytest.raises(ValueError, match="carries a object under .control., which the sdxl_core sampler cannot run"):
        sample_with(tiny_base, latent, foreign, conditioning[1], seed=1, steps=2, cfg=5.0, sampler="euler",
                      scheduler="normal")
    from sdxl_core.pipeline import encode_refiner_conditioning
    refiner_pos = encode_refiner_conditioning(tiny_refiner, PROMPT)
    refiner_neg = encode_refiner_conditioning(tiny_refiner, NEGATIVE)
    positive, negative = apply_controlnet(refiner_pos, refiner_neg, controlnet, control_image(), 1.0)
    with pytest.raises(ValueError, match="made for another UNet"):
        sample_with(tiny_refiner, latent, positive, negative, seed=1, steps=2, cfg=5.0, sampler="euler",
                      scheduler="normal")


def test_residual_lists_follow_comfyuis_popping_order():
    from sdxl_core.config import SDXL_BASE_UNET, TINY_BASE_UNET
    from sdxl_core.sampling.control import input_block_count, residuals_from_lists

    assert input_block_count(SDXL_BASE_UNET) == 9 and input_block_count(TINY_BASE_UNET) == 9
    t = [torch.full((1,), float(i)) for i in range(9)]
    full = residuals_from_lists({"output": t, "middle": [t[0], t[8]]}, 9)
    assert full.skips == tuple(t) and full.middle is t[8] and full.inputs == ()
    # A shorter list: the UNet pops from the end, so it reaches the deepest skips, or the first input blocks.
    short = residuals_from_lists({"output": t[:2], "input": t[:3]}, 9)
    assert short.skips == (None,) * 7 + (t[0], t[1]) and short.middle is None
    assert short.inputs == (t[2], t[1], t[0]) + (None,) * 6
    with pytest.raises(ValueError, match="made for another UNet"):
        residuals_from_lists({"output": t + t}, 9)


def test_an_external_control_gets_each_calls_input_and_is_batched_like_ours(tiny_base, controlnet, conditioning):
    """The hook the ComfyUI pack drives ComfyUI's ControlNets through: wrapping our own application in it gives the
    same latents, with every call's unscaled input and per-item sigma handed over."""
    from sdxl_core.sampling.control import ExternalControl, control_schedule

    class Wrapped(ExternalControl):
        def __init__(self, application):
            self.application, self.calls, self.schedule = application, [], None

        def prepare(self, schedule, unet_config, where):
            self.schedule = control_schedule(self.application, schedule, unet_config, where)
            return self

        def at(self, sigma, chunks, x=None, sigmas=None):
            self.calls.append((chunks, tuple(x.shape), tuple(sigmas.shape), float(sigmas[0]) == sigma))
            return self.schedule.at(sigma, chunks)

    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    positive, negative = apply_controlnet(*conditioning, controlnet, control_image(), 0.8, 0.1, 0.9)
    wrapped = Wrapped(positive[0][1]["control"])
    assert negative[0][1]["control"] is wrapped.application  # one application, so both sides batch together
    external = ([[c, {**o, "control": wrapped}] for c, o in positive], [[c, {**o, "control": wrapped}]
                                                                         for c, o in negative])
    settings = dict(seed=SEED, steps=4, cfg=CFG, sampler="euler", scheduler="normal")
    expected = sample_with(tiny_base, latent, positive, negative, **settings)
    out = sample_with(tiny_base, latent, *external, **settings)
    assert torch.equal(out["samples"], expected["samples"])
    assert wrapped.calls == [(2, (2, 4, SIZE // 8, SIZE // 8), (2,), True)] * 4
