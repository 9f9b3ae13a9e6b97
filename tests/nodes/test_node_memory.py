"""What the nodes hold in memory when, on the tiny checkpoints: the loader reads no UNet or text encoder, each node
reads the networks of its step and releases them after it, weights stay in the file's precision, and nothing the
loader returns (what ComfyUI's output cache keeps) pins a UNet between runs."""

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import sdxl_core.pipeline
import sdxl_core.sampling.ksampler
from nodes import comfy_host
from tests._nodes_helpers import model_folders, node, use_folders

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS, HANDOFF = 3, 2


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    found = model_folders(tmp_path_factory.mktemp("models"), tiny_checkpoints)
    use_folders(found)
    yield found
    comfy_host.set_standalone_model_folders({})


@pytest.fixture
def watched(monkeypatch):
    """Record, whenever a node encodes a prompt or samples, what every watched model holds at that moment."""
    models: dict[str, object] = {}
    seen: list[dict] = []

    def snapshot(event: str, model) -> None:
        seen.append({"event": f"{model.kind} {event}",
                     "held": {kind: watched_model.resident_components() for kind, watched_model in models.items()}})

    def wrap(module, name: str, event: str):
        real = getattr(module, name)

        def recording(model, *args, **kwargs):
            snapshot(event, model)
            if event == "sample":
                seen[-1]["unet"] = weakref.ref(model.unet)
                seen[-1]["stored"] = next(model.unet.parameters()).dtype
            return real(model, *args, **kwargs)

        monkeypatch.setattr(module, name, recording)

    wrap(sdxl_core.pipeline, "encode_base_conditioning", "text")
    wrap(sdxl_core.pipeline, "encode_refiner_conditioning", "text")
    wrap(sdxl_core.sampling.ksampler, "sample_latent", "sample")
    return models, seen


def _two_stage(base, refiner, base_vae):
    positive = node("TextEncodeBase").encode(base, "a red cube", "", "encode")[0]
    negative = node("TextEncodeBase").encode(base, "blurry", "", "encode")[0]
    refiner_positive = node("TextEncodeRefiner").encode(refiner, "a red cube", "encode")[0]
    refiner_negative = node("TextEncodeRefiner").encode(refiner, "blurry", "encode")[0]
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    (latent,) = node("BaseSampler").sample(base, positive, negative, latent, 7, STEPS, 5.0, "euler", "normal",
                                           HANDOFF, True, 1.0)
    (latent,) = node("RefinerSampler").sample(refiner, refiner_positive, refiner_negative, latent, 7, STEPS, 5.0,
                                              "euler", "normal", HANDOFF, 1.0)
    (image,) = node("VAEDecode").decode(base_vae, latent, "auto")
    return latent, image


def test_the_loader_reads_only_the_vae(folders):
    base, vae = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    refiner, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")
    assert base.resident_components() == ("vae",) and refiner.resident_components() == ("vae",)
    assert vae is base.vae
    # Nothing read yet, but the loader already knows what each network will weigh as held: the file's fp16.
    assert base.weight_bytes("unet") == 2 * base.weight_elements("unet")


def test_each_node_holds_only_its_own_step_and_releases_it(folders, watched):
    models, seen = watched
    base, base_vae = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    refiner, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")
    models.update(base=base, refiner=refiner)
    _, image = _two_stage(base, refiner, base_vae)
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
    events = [entry["event"] for entry in seen]
    assert events == ["base text", "base text", "refiner text", "refiner text", "base sample", "refiner sample"]
    held = {entry["event"]: entry["held"] for entry in seen}
    # While text is encoded, only that stage's text encoders (and the VAEs the loaders returned) are in memory.
    assert held["base text"] == {"base": ("vae", "clip_g", "clip_l"), "refiner": ("vae",)}
    assert held["refiner text"] == {"base": ("vae",), "refiner": ("vae", "clip_g")}
    # While one stage samples, its UNet alone: no text encoder, never the other stage's UNet.
    assert held["base sample"] == {"base": ("unet", "vae"), "refiner": ("vae",)}
    assert held["refiner sample"] == {"base": ("vae",), "refiner": ("unet", "vae")}
    # After the run the loaders' outputs (what ComfyUI's cache keeps) hold no UNet or text encoder, and nothing
    # else keeps the UNets that were read alive.
    assert base.resident_components() == ("vae",) and refiner.resident_components() == ("vae",)
    gc.collect()
    assert all(entry["unet"]() is None for entry in seen if "unet" in entry)


def test_weights_stay_in_the_file_precision_and_give_the_fp32_result(folders, watched, tiny_checkpoints):
    """The fp16 file is held in fp16 and computed in fp32 on the CPU: the same latent as every weight in fp32."""
    from sdxl_core.checkpoints.loading import load_checkpoint

    models, seen = watched
    base, base_vae = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    refiner, _ = node("CheckpointLoader").load("tiny_sdxl_refiner.safetensors", "default")
    latent, _ = _two_stage(base, refiner, base_vae)
    assert base.dtype == torch.float32
    assert [entry["stored"] for entry in seen if "stored" in entry] == [torch.float16, torch.float16]

    # The same graph on models read whole in fp32: networks already in memory stay where the caller put them.
    whole = {kind: load_checkpoint(tiny_checkpoints[kind], storage_dtype=torch.float32) for kind in ("base", "refiner")}
    seen.clear()
    whole_latent, _ = _two_stage(whole["base"], whole["refiner"], whole["base"].vae)
    assert [entry["stored"] for entry in seen if "stored" in entry] == [torch.float32, torch.float32]
    assert whole["base"].resident_components() == ("unet", "vae", "clip_g", "clip_l")
    torch.testing.assert_close(latent["samples"], whole_latent["samples"], rtol=0, atol=1e-6)


def test_a_lora_merge_keeps_its_patched_networks_and_reads_the_rest_per_step(folders, watched, tmp_path,
                                                                             tiny_checkpoints):
    """A merged UNet cannot be read back from the file, so it stays with the LoRA node's output; the input model
    comes back holding what it held before the merge, and the merge reads its text encoders per step."""
    from safetensors.torch import save_file

    from sdxl_core.checkpoints.loading import load_checkpoint
    from tests._lora_files import kohya_lora

    models, seen = watched
    base, _ = node("CheckpointLoader").load("tiny_sdxl_base.safetensors", "default")
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(kohya_lora(load_checkpoint(tiny_checkpoints["base"]), text=False), str(lora_dir / "tiny.safetensors"))
    use_folders({**folders, "loras": [str(lora_dir)]})
    try:
        (merged,) = node("LoraLoader").apply(base, "tiny.safetensors", 1.0, 0.0)
    finally:
        use_folders(folders)
    assert base.resident_components() == ("vae",)
    assert "unet" in merged.resident_components() and not merged.can_release("unet")
    models.update(merged=merged)
    node("TextEncodeBase").encode(merged, "a red cube", "", "encode")
    assert seen[-1]["held"]["merged"] == ("unet", "vae", "clip_g", "clip_l")
    assert merged.resident_components() == ("unet", "vae")


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run")
def test_in_comfyui_model_management_places_each_step_and_lets_it_go(tiny_checkpoints):
    """Inside a real ComfyUI: a step's networks are ComfyUI loaded models while the step runs (so ComfyUI can count
    and evict them), and once the step has released them ComfyUI holds nothing of them either."""
    comfyui = os.environ["COMFYUI_PATH"]
    script = f"""
import gc, importlib.util, sys, weakref
sys.path.insert(0, {comfyui!r})
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_management as mm
import folder_paths
import torch
folder_paths.add_model_folder_path("checkpoints", {str(tiny_checkpoints["base"].parent)!r})
spec = importlib.util.spec_from_file_location("pack_under_test", {str(REPO / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
import sdxl_core.sampling.ksampler as ksampler
# The V1 declarations (inside a V3-capable ComfyUI the pack registers them through comfy_entrypoint instead).
nodes = {{name.split(".")[-1]: cls for name, cls in sys.modules["pack_under_test.nodes"].NODE_CLASS_MAPPINGS.items()}}

def alive():
    gc.collect()
    return sorted(type(lm.model.model.network).__name__ for lm in mm.current_loaded_models if lm.model is not None)

gc.disable()  # what the stages free must go without waiting for a garbage collection
import sdxl_core.pipeline as pipeline
real_encode = pipeline.encode_base_conditioning
encoders = []
def recording_encode(model, *args, **kwargs):
    encoders.append(weakref.ref(model.clip_g))
    return real_encode(model, *args, **kwargs)
pipeline.encode_base_conditioning = recording_encode
real = ksampler.sample_latent
unets = []
def recording(model, *args, **kwargs):
    unets.append(weakref.ref(model.unet))
    print("while sampling", model.resident_components(), alive())
    return real(model, *args, **kwargs)
ksampler.sample_latent = recording
base, vae = nodes["CheckpointLoader"]().load({tiny_checkpoints["base"].name!r}, "default")
print("after load", base.resident_components(), alive())
positive = nodes["TextEncodeBase"]().encode(base, "a red cube", "", "encode")[0]
negative = nodes["TextEncodeBase"]().encode(base, "blurry", "", "encode")[0]
print("text encoders freed", [encoder() is None for encoder in encoders])
print("after text", base.resident_components(), alive())
nodes["BaseSampler"]().sample(base, positive, negative, {{"samples": torch.zeros(1, 4, 8, 8)}}, 1, 2, 5.0, "euler",
                              "normal", 2, True, 1.0)
freed = unets[0]() is None
print("after sampling", base.resident_components(), alive(), "unet freed", freed)
"""
    result = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", script], cwd=comfyui,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "after load ('vae',) []" in lines
    assert "after text ('vae',) []" in lines
    assert "while sampling ('unet', 'vae') ['UNetModel']" in lines
    assert "text encoders freed [True, True]" in lines
    assert "after sampling ('vae',) [] unet freed True" in lines
