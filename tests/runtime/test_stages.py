"""Stage by stage: what a checkpoint-backed model holds when, through the two-stage run (tiny checkpoints)."""

import gc
import weakref

import pytest
import torch

from sdxl_core.checkpoints.loading import load_checkpoint, open_checkpoint
from sdxl_core.checkpoints.lora import apply_lora
from sdxl_core.models.bundle import SDXLModel
from sdxl_core.pipeline import GenerationRequest, encode_base_conditioning, generate
from sdxl_core.runtime.residency import ResidencyPlan
from sdxl_core.runtime.stages import pipeline_stage
from tests._lora_files import kohya_lora

REQUEST = GenerationRequest(prompt="a lighthouse", negative="blurry", width=64, height=64, steps=4,
                            refiner_start=3, cfg=5.0, seed=7)


class _Spy:
    """A reader that reports each read and otherwise is the real one (sizes, device, dtypes)."""

    def __init__(self, on_read, reader):
        self._on_read, self._reader = on_read, reader

    def __call__(self, name):
        return self._on_read(name)

    def __getattr__(self, attribute):
        return getattr(self._reader, attribute)


class Journal:
    """Every read and release of the models it watches, with what each model held at that moment."""

    def __init__(self, monkeypatch, *models: SDXLModel):
        self.events: list[tuple[str, str, str]] = []
        self.alive: dict[str, weakref.ref] = {}
        self.models = models
        for model in models:
            read = model._reader

            def spy(name, model=model, read=read):
                gc.collect()
                self.held_at_read = {m.kind: m.resident_components() for m in self.models}
                self.events.append(("read", model.kind, name))
                self.dead_before = {key: ref() is None for key, ref in self.alive.items()}
                module = read(name)
                self.alive[f"{model.kind}.{name}"] = weakref.ref(module)
                return module

            monkeypatch.setattr(model, "_reader", _Spy(spy, read))
        real_release = SDXLModel.release

        def release(model, name):
            self.events.append(("release", model.kind, name))
            real_release(model, name)

        monkeypatch.setattr(SDXLModel, "release", release)


def test_open_checkpoint_reads_nothing_until_a_network_is_used(tiny_checkpoints):
    model = open_checkpoint(tiny_checkpoints["base"])
    assert model.resident_components() == ()
    assert model.unet is model.unet  # read once, then held
    assert model.resident_components() == ("unet",)
    model.release("unet")
    assert model.resident_components() == ()


def test_generate_holds_one_step_s_networks_at_a_time(tiny_checkpoints, monkeypatch):
    base = open_checkpoint(tiny_checkpoints["base"])
    refiner = open_checkpoint(tiny_checkpoints["refiner"])
    journal = Journal(monkeypatch, base, refiner)
    held_at_steps = []
    generate(base, refiner, REQUEST, on_step=lambda stage: held_at_steps.append(
        (stage, base.resident_components(), refiner.resident_components())))
    assert journal.events == [
        ("read", "base", "clip_l"), ("read", "base", "clip_g"),
        ("release", "base", "clip_l"), ("release", "base", "clip_g"),
        ("read", "base", "unet"), ("release", "base", "unet"),
        ("read", "refiner", "clip_g"), ("release", "refiner", "clip_g"),
        ("read", "refiner", "unet"), ("release", "refiner", "unet"),
        ("read", "base", "vae"), ("release", "base", "vae")]
    # While a UNet samples, it is the only network in memory: no text encoder, no other UNet.
    assert held_at_steps == [("base", ("unet",), ())] * 3 + [("refiner", (), ("unet",))]
    # Released means gone, not merely unreferenced by the model: nothing else kept the networks alive.
    assert all(journal.dead_before.values()) and len(journal.dead_before) == 5
    assert base.resident_components() == () and refiner.resident_components() == ()


def test_stage_by_stage_gives_the_same_bits_as_loading_everything(tiny_checkpoints):
    whole = generate(load_checkpoint(tiny_checkpoints["base"]), load_checkpoint(tiny_checkpoints["refiner"]),
                     REQUEST)
    staged = generate(open_checkpoint(tiny_checkpoints["base"]), open_checkpoint(tiny_checkpoints["refiner"]),
                      REQUEST)
    by_path = generate(tiny_checkpoints["base"], tiny_checkpoints["refiner"], REQUEST)
    assert torch.equal(whole.latent["samples"], staged.latent["samples"])
    assert torch.equal(whole.images, staged.images) and torch.equal(whole.images, by_path.images)


def test_networks_already_in_memory_stay_as_the_caller_had_them(tiny_checkpoints):
    loaded = load_checkpoint(tiny_checkpoints["base"])
    unet = loaded.unet
    generate(loaded, None, REQUEST)
    assert loaded.resident_components() == ("unet", "vae", "clip_g", "clip_l") and loaded.unet is unet
    opened = open_checkpoint(tiny_checkpoints["base"])
    touched = opened.unet  # e.g. to optimise it in place: generate must not swap it for a fresh read
    generate(opened, None, REQUEST)
    assert opened.resident_components() == ("unet",) and opened.unet is touched


def test_a_lora_patched_network_is_kept_and_the_rest_still_released(tiny_checkpoints, monkeypatch):
    base = open_checkpoint(tiny_checkpoints["base"])
    patched = apply_lora(base, kohya_lora(load_checkpoint(tiny_checkpoints["base"]), text=False), 0.5)
    # The merge keeps what it patched; the text encoders it read to match names went back.
    assert patched.resident_components() == ("unet",) and base.resident_components() == ()
    assert not patched.can_release("unet") and patched.can_release("clip_g")
    with pytest.raises(ValueError, match="changed after loading"):
        patched.release("unet")
    generate(patched, None, REQUEST)
    assert patched.resident_components() == ("unet",)


def test_a_failing_step_still_releases_what_it_read(tiny_checkpoints):
    base = open_checkpoint(tiny_checkpoints["base"])
    with pytest.raises(RuntimeError, match="boom"):
        with pipeline_stage(base, "text"):
            encode_base_conditioning(base, "a cube")
            raise RuntimeError("boom")
    assert base.resident_components() == ()


def test_a_residency_plan_lets_go_of_released_networks(tiny_checkpoints):
    base = open_checkpoint(tiny_checkpoints["base"])
    refiner = open_checkpoint(tiny_checkpoints["refiner"])
    plan = ResidencyPlan("cpu")
    planned = generate(base, refiner, REQUEST, residency=plan)
    assert [e.name for e in plan.events if e.action == "load"] == [
        "base.clip_l", "base.clip_g", "base.unet", "refiner.clip_g", "refiner.unet", "base.vae"]
    assert plan.summary()["managed"] == {}  # no host copies of released networks left behind in the plan
    assert torch.equal(planned.images, generate(tiny_checkpoints["base"], tiny_checkpoints["refiner"],
                                                REQUEST).images)
