"""ComfyUI's own MODEL / CLIP / VAE in our nodes and ours handed to ComfyUI, in a real ComfyUI (imported in a child
process with ComfyUI's interpreter, tests/nodes/_comfyui_core_types_child.py), on the tiny checkpoints.

- In: ComfyUI's CheckpointLoaderSimple (and its LoraLoader) into our text encoders, samplers and VAE decode gives
  the images our own loader gives; patches our core cannot run are refused with a sentence naming them.
- Out: our loader through 'SDXL to ComfyUI' into core CLIPTextEncodeSDXL / KSamplerAdvanced / VAEDecode gives the
  images of the same core nodes on ComfyUI's own load, on our tensors (same data pointers), counted once by
  ComfyUI's model management.
- ControlNet: ComfyUI's ControlNetLoader + Apply ControlNet (Advanced) into our sampler equals core KSamplerAdvanced
  with the same ControlNet (to fp32 rounding: our sampler and ComfyUI's differ by that without a ControlNet too).

Skipped unless COMFYUI_PATH names a ComfyUI checkout; COMFYUI_PYTHON names the interpreter with its requirements.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run")]
CHILD = Path(__file__).with_name("_comfyui_core_types_child.py")
# Our sampler against ComfyUI's KSampler on the same weights: fp32 rounding (about 1e-6 of the largest value).
SAMPLER_RELATIVE = 1e-5


@pytest.fixture(scope="module")
def results(tiny_checkpoints, tmp_path_factory):
    import shutil

    from safetensors.torch import save_file

    from sdxl_core.checkpoints.loading import load_checkpoint
    from tests._lora_files import kohya_lora
    from tests.models.test_controlnet import random_controlnet

    models = tmp_path_factory.mktemp("comfyui_models")
    for folder in ("checkpoints", "loras", "controlnet"):
        (models / folder).mkdir()
    for kind, path in tiny_checkpoints.items():
        shutil.copyfile(path, models / "checkpoints" / f"tiny_sdxl_{kind}.safetensors")
    lora = kohya_lora(load_checkpoint(tiny_checkpoints["base"]), seed=7)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(models / "loras" / "tiny_style.safetensors"))
    # The original single-file ControlNet layout, which ComfyUI's ControlNetLoader reads.
    controlnet = random_controlnet()
    save_file({"control_model." + k: v.contiguous() for k, v in controlnet.state_dict().items()},
              str(models / "controlnet" / "tiny_controlnet.safetensors"))
    run = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(CHILD), COMFYUI, str(REPO),
                          str(models)], cwd=COMFYUI, capture_output=True, text=True, timeout=1200)
    found = {}
    for line in run.stdout.splitlines():
        if line.startswith("CASE "):
            _, name, payload = line.split(" ", 2)
            found[name] = json.loads(payload)
    if not found:
        pytest.fail(f"the ComfyUI child printed no results (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return found


def _case(results, name) -> dict:
    result = results[name]
    assert "error" not in result, result.get("error")
    return result


def test_comfyui_checkpoint_loader_into_our_nodes_equals_our_loader(results):
    result = _case(results, "comfy_in")
    assert result["diffs"] == {key: 0.0 for key in result["diffs"]} and len(result["diffs"]) == 6
    assert result["unet_shares_comfy_tensors"]  # our UNet runs on ComfyUI's loaded tensors: nothing copied
    # ComfyUI counts the MODEL / CLIP / VAE it loaded while our nodes ran on them.
    assert {"SDXL", "SDXLRefiner", "TinySDXLClipModel", "AutoencoderKL"} <= set(result["loaded"])


def test_comfyui_lora_patches_reach_our_nodes(results):
    result = _case(results, "comfy_lora")
    assert result["lora_effect"] > 0.05  # the LoRA changes the image
    assert result["relative"]["positive"] == 0.0  # the text encoders' LoRA, both merged in the same precision
    # ComfyUI merges the UNet's LoRA into fp32 weights on the CPU, our loader into the file's fp16 ones.
    assert max(result["relative"].values()) < 2e-3
    assert result["plain_unchanged"] == 0.0  # the un-LoRA'd MODEL afterwards: ComfyUI unpatched its clone


def test_sdxl_to_comfyui_runs_core_nodes_on_our_tensors(results):
    result = _case(results, "comfy_out")
    assert result["diffs"] == {key: 0.0 for key in result["diffs"]} and len(result["diffs"]) == 4
    assert result["sharing"] == {"unet": True, "clip": True, "vae": True}
    assert result["same_objects"]  # converting again hands back the same ComfyUI objects
    # Counted once: ComfyUI's own classes only, no second patcher of ours over the same tensors.
    assert result["loaded"] == sorted(result["loaded"]) and "_Holder" not in result["loaded"]
    assert result["ours_after_finite"]
    assert result["unet_bytes"] <= result["model_size"] < result["unet_bytes"] * 1.01


def test_comfyuis_queue_time_validation_accepts_either_type_in_our_sockets(results):
    result = _case(results, "queue_validation")
    assert result["comfy_into_ours"] == {"valid": True, "errors": []}
    assert result["ours_into_comfy"] == {"valid": True, "errors": []}
    # SDXL_VAE into core VAE Decode: only our own VAE sockets take both.
    assert not result["wrong"]["valid"] and result["wrong"]["errors"] == ["return_type_mismatch"]


def test_converted_objects_are_released_with_our_model(results):
    result = _case(results, "release")
    assert result["loaded_while_used"] >= 3  # MODEL, CLIP and VAE counted while used
    assert result["alive"] == [False] * 5 and result["loaded_after"] == 0


def test_patches_our_core_cannot_run_are_refused_by_name(results):
    result = _case(results, "refusals")
    assert "attention replacements (transformer_options patches_replace" in result["attention"]
    assert "custom CFG function (sampler_cfg_function" in result["cfg_function"]
    assert "CLIP Set Last Layer" in result["last_layer"]
    assert "needs the SDXL refiner checkpoint" in result["wrong_stage"]
    assert "needs the SDXL base checkpoint" in result["refiner_clip_in_base"]
    assert result["refiner_ok"] == "no error"


@pytest.mark.parametrize("setting", ["full_one", "full_chained", "partial_one", "partial_chained"])
def test_comfyui_controlnet_in_our_sampler_equals_core_ksampler(results, setting):
    result = _case(results, "controlnet")
    entry = result[setting]
    assert entry["ours_vs_core"] < SAMPLER_RELATIVE  # ComfyUI's MODEL
    assert entry["our_model_vs_core"] < SAMPLER_RELATIVE  # our SDXL_MODEL, core KSampler on its SDXL to ComfyUI
    assert entry["same_weights"] == 0.0
    assert result["effect"] > 1.0 and result["cleaned_up"]


def test_legacy_apply_controlnet_reaches_the_negative_as_in_comfyui(results):
    legacy = _case(results, "controlnet")["legacy"]
    assert legacy["ours_vs_core"] < SAMPLER_RELATIVE and legacy["effect"] > 1.0
