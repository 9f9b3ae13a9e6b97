"""sdxl_core.runtime.residency: the 8 GB plan's policy (one UNet at a time, text encoders out when a UNet needs the
room), its budget errors, and that running the pipeline under a plan changes no result."""

import pytest
import torch
from torch import nn

from sdxl_core.conditioning import BaseMicroConditioning, RefinerMicroConditioning
from sdxl_core.config import SDXL_BASE, SDXL_REFINER
from sdxl_core.models.unet import UNetModel
from sdxl_core.models.vae import AutoencoderKL
from sdxl_core.pipeline import (
    GenerationRequest,
    decode,
    empty_latent,
    encode_base_conditioning,
    encode_refiner_conditioning,
    generate,
)
from sdxl_core.runtime.residency import DEFAULT_ACTIVATION_RESERVE, GiB, ResidencyError, ResidencyPlan, no_residency
from sdxl_core.sampling.ksampler import sample_latent
from sdxl_core.text.encoders import TextEncoder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine oversubscription costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sizes(model) -> dict[str, int]:
    """Bytes of each component's parameters and buffers (the text encoders keep position ids as a buffer)."""
    return {name: sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
            for name, module in model.modules().items()}


def staged_generate(base, refiner, request: GenerationRequest, stage):
    """`pipeline.generate` for output-size micro-conditioning, each step inside `stage(model, part)`: the shape
    of the integration proposed for the pipeline (`generate(..., residency=plan)`)."""
    size = (request.height, request.width)
    with stage(base, "text"):
        positive = encode_base_conditioning(base, request.prompt, micro=BaseMicroConditioning(size))
        negative = encode_base_conditioning(base, request.negative, micro=BaseMicroConditioning(size))
    with stage(base, "unet"):
        latent = sample_latent(base, empty_latent(request.width, request.height), positive, negative,
                               request.sampling, end_step=request.refiner_start, return_with_leftover_noise=True)
    with stage(refiner, "text"):
        refiner_positive = encode_refiner_conditioning(refiner, request.prompt, micro=RefinerMicroConditioning(size),
                                                       aesthetic_score=request.aesthetic_score)
        refiner_negative = encode_refiner_conditioning(refiner, request.negative, micro=RefinerMicroConditioning(size),
                                                       aesthetic_score=request.negative_aesthetic_score)
    with stage(refiner, "unet"):
        latent = sample_latent(refiner, latent, refiner_positive, refiner_negative, request.sampling,
                               start_step=request.refiner_start, add_noise=False)
    with stage(base, "vae"):
        return decode(base, latent), latent


REQUEST = GenerationRequest(prompt="a lighthouse", negative="blurry", width=64, height=64, steps=4,
                            refiner_start=3, cfg=5.0, seed=7)


def test_staged_run_under_a_tight_plan_equals_generate(tiny_base, tiny_refiner):
    expected = generate(tiny_base, tiny_refiner, REQUEST)
    base, refiner = _sizes(tiny_base), _sizes(tiny_refiner)
    # Room for one UNet plus the VAE, not for a UNet plus text encoders: the 8 GB shape, in miniature.
    budget = max(base["unet"], refiner["unet"]) + base["vae"]
    assert budget < base["unet"] + base["clip_l"] + base["clip_g"]
    plan = ResidencyPlan("cpu", budget)
    images, latent = staged_generate(tiny_base, tiny_refiner, REQUEST, plan.stage)
    assert torch.equal(latent["samples"], expected.latent["samples"])
    assert torch.equal(images, expected.images)

    loads = [e.name for e in plan.events if e.action == "load"]
    assert loads == ["base.clip_l", "base.clip_g", "base.unet", "refiner.clip_g", "refiner.unet", "base.vae"]
    assert not plan.moves_weights  # CPU: the books are kept, nothing moves
    assert plan.peak_resident_bytes <= budget
    # Never two UNets at once, and the text encoders leave before a UNet runs beside them.
    resident = set()
    for event in plan.events:
        (resident.add if event.action == "load" else resident.discard)(event.name)
        assert not {"base.unet", "refiner.unet"} <= resident
        assert event.resident_bytes <= budget
    # The refiner's small text encoder and UNet fit together, so nothing forces it out: eviction is by need (LRU).
    assert [(e.action, e.name) for e in plan.events if e.action == "offload"] == [
        ("offload", "base.clip_l"), ("offload", "base.clip_g"), ("offload", "base.unet")]
    assert set(plan.resident) == {"refiner.clip_g", "refiner.unet", "base.vae"}
    summary = plan.summary()
    assert summary["loads"] == 6 and summary["peak_resident_bytes"] == plan.peak_resident_bytes


def test_unlimited_plan_never_evicts_and_no_residency_is_a_null_context(tiny_base, tiny_refiner):
    plan = ResidencyPlan("cpu")
    staged_generate(tiny_base, tiny_refiner, REQUEST, plan.stage)
    assert not [e for e in plan.events if e.action == "offload"]
    base, refiner = _sizes(tiny_base), _sizes(tiny_refiner)
    assert plan.peak_resident_bytes == sum(base.values()) + refiner["unet"] + refiner["clip_g"]
    with no_residency(tiny_base, "unet"):
        pass
    with pytest.raises(ValueError, match="unknown stage part"):
        no_residency(tiny_base, "clip")


def test_lru_eviction_order():
    modules = {name: nn.Linear(16, 16) for name in "abcd"}
    size = sum(p.numel() * 4 for p in modules["a"].parameters())
    plan = ResidencyPlan("cpu", 2 * size)
    for name in "ab":
        with plan.use({name: modules[name]}):
            pass
    with plan.use({"a": modules["a"]}):  # a is now more recent than b
        pass
    with plan.use({"c": modules["c"]}):
        pass
    assert set(plan.resident) == {"a", "c"}
    assert [e.name for e in plan.events if e.action == "offload"] == ["b"]


def test_stage_larger_than_budget_is_refused_clearly(tiny_base):
    plan = ResidencyPlan("cpu", 1000)
    with pytest.raises(ResidencyError, match=r"this stage needs .* GiB of weights \(base.unet .*budget is"):
        with plan.stage(tiny_base, "unet"):
            pass
    assert plan.resident == ()


def test_enclosing_stage_in_use_is_not_evicted():
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    size = sum(p.numel() * 4 for p in a.parameters())
    plan = ResidencyPlan("cpu", size + size // 2)
    with plan.use({"a": a}):
        with pytest.raises(ResidencyError, match="in use by enclosing stages \\(a\\)"):
            with plan.use({"b": b}):
                pass
        assert plan.resident == ("a",)


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget_bytes must be positive"):
        ResidencyPlan("cpu", 0)
    with pytest.raises(ValueError, match="leaves nothing for weights"):
        ResidencyPlan.for_device_memory("cpu", 2 * GiB)
    plan = ResidencyPlan.for_device_memory("cpu", 8 * GiB)
    assert plan.budget_bytes == 8 * GiB - DEFAULT_ACTIVATION_RESERVE
    with pytest.raises(ValueError, match="unknown stage part"):
        plan.stage(None, "decoder")
    with pytest.raises(ValueError, match="for_card sizes a plan from a CUDA device"):
        ResidencyPlan.for_card("cpu")
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ResidencyError, match="meta \\(unloaded\\) weights"):
        with plan.use({"meta": meta}):
            pass


class _MovingPlan(ResidencyPlan):
    """Runs the weight-moving code path on a CPU-only machine (host and device are the same CPU here)."""

    @property
    def moves_weights(self) -> bool:
        return True


def test_move_path_keeps_weights_and_detects_structure_changes():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    x = torch.randn(3, 8)
    expected = module(x)
    plan = _MovingPlan("cpu", 10**6)
    for _ in range(2):
        with plan.use({"m": module}):
            assert torch.equal(module(x), expected)
        plan.offload_all()
        assert plan.resident == ()
    module.append(nn.Linear(8, 8))
    with pytest.raises(ResidencyError, match="changed its parameters since it was put under the residency plan"):
        with plan.use({"m": module}):
            pass
    plan.release(module)
    assert plan.summary()["managed"] == {}


def test_8gib_budget_fits_one_full_size_fp16_unet_but_not_with_text_encoders():
    """The numbers behind DEFAULT_ACTIVATION_RESERVE, from full-size meta models (no memory used)."""
    def fp16_bytes(module):
        return sum(p.numel() * 2 for p in module.parameters())

    base_unet = fp16_bytes(UNetModel(SDXL_BASE.unet, device="meta"))
    refiner_unet = fp16_bytes(UNetModel(SDXL_REFINER.unet, device="meta"))
    text = fp16_bytes(TextEncoder(SDXL_BASE.clip_l, device="meta")) + fp16_bytes(
        TextEncoder(SDXL_BASE.clip_g, device="meta"))
    vae = fp16_bytes(AutoencoderKL(SDXL_BASE.vae, device="meta"))
    for card in (8 * GiB, int(7.5 * GiB)):  # the cap, and a real 8 GB card after its CUDA context
        budget = ResidencyPlan.for_device_memory("cpu", card).budget_bytes
        assert base_unet <= budget and refiner_unet + vae <= budget
        assert base_unet + text > budget  # the text encoders must leave before the base UNet arrives
        assert base_unet + refiner_unet > budget


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moving weights needs a GPU")
def test_cuda_plan_moves_weights_and_frees_them():
    a, b = nn.Linear(1024, 1024), nn.Linear(1024, 1024)
    size = sum(p.numel() * 4 for p in a.parameters())
    plan = ResidencyPlan("cuda", size + size // 2, pin_memory=True)
    before = torch.cuda.memory_allocated()
    with plan.use({"a": a}):
        assert a.weight.is_cuda and torch.cuda.memory_allocated() - before >= size
    with plan.use({"b": b}):
        assert b.weight.is_cuda and not a.weight.is_cuda
    assert torch.cuda.memory_allocated() - before < 2 * size
