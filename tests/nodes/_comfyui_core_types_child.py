"""Run inside ComfyUI's interpreter by tests/nodes/test_comfyui_core_types.py: ComfyUI imported in this process,
the pack loaded as ComfyUI loads it, the tiny checkpoints taught to ComfyUI (tests/_comfyui_tiny_sdxl.py). Every
case prints one JSON line `CASE <name> <result>` with the figures the test asserts on (or the error it met).

    python _comfyui_core_types_child.py COMFYUI_PATH REPO MODELS_DIR
"""

import importlib.util
import json
import sys
import traceback

COMFY, REPO, MODELS = sys.argv[1:4]
CHOSEN = sys.argv[4:]
sys.path.insert(0, COMFY)
sys.argv = ["main.py", "--cpu"]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402

torch.set_num_threads(1)

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner  # noqa: E402
from comfy_extras.nodes_model_advanced import RescaleCFG  # noqa: E402

import nodes as comfy_nodes  # noqa: E402


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


pack = _load("pack_under_test", f"{REPO}/__init__.py")  # as ComfyUI imports a custom node folder
_load("tiny_sdxl_for_comfyui", f"{REPO}/tests/_comfyui_tiny_sdxl.py").register()
host = sys.modules["pack_under_test.nodes.comfy_host"]
# The nodes as declared (the V1 classes; inside ComfyUI the pack registers their V3 statement, see queue_validation).
DECLARED = sys.modules["pack_under_test.nodes"].NODE_CLASS_MAPPINGS
for folder in ("checkpoints", "loras", "controlnet"):
    folder_paths.add_model_folder_path(folder, f"{MODELS}/{folder}")
host.set_standalone_model_folders({})

W, H, STEPS, HANDOFF, SEED, CFG = 64, 96, 4, 3, 5, 7.0
PROMPT, NEGATIVE = "a lighthouse on a cliff", "blurry"


def node(name):
    return DECLARED["SDXLTwoStage." + name]()


def first(output):
    return getattr(output, "result", output)[0]


def diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def relative(a, b) -> float:
    return diff(a, b) / max(float(b.float().abs().max()), 1e-12)


def comfy_checkpoint(kind):
    return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(f"tiny_sdxl_{kind}.safetensors")[:3]


def our_checkpoint(kind):
    host.set_standalone_model_folders({"checkpoints": [f"{MODELS}/checkpoints"]})
    return node("CheckpointLoader").load(f"tiny_sdxl_{kind}.safetensors", "default")


def our_two_stage(base, base_text, refiner, refiner_text, vae, positive=None, negative=None):
    """Our nodes: base encode + sample to K, refiner encode + sample from K, decode."""
    positive = positive or node("TextEncodeBase").encode(base_text, PROMPT, "", "encode")[0]
    negative = negative or node("TextEncodeBase").encode(base_text, NEGATIVE, "", "encode")[0]
    latent = node("EmptyLatent").generate("custom", W, H, 1)[0]
    handoff = node("BaseSampler").sample(base, positive, negative, latent, SEED, STEPS, CFG, "euler", "normal",
                                         HANDOFF, True, 1.0)[0]
    refiner_positive = node("TextEncodeRefiner").encode(refiner_text, PROMPT, "encode")[0]
    refiner_negative = node("TextEncodeRefiner").encode(refiner_text, NEGATIVE, "encode")[0]
    refined = node("RefinerSampler").sample(refiner, refiner_positive, refiner_negative, handoff, SEED, STEPS, CFG,
                                            "euler", "normal", HANDOFF, 1.0)[0]
    image = node("VAEDecode").decode(vae, refined, "auto")[0]
    return {"positive": positive[0][0], "pooled": positive[0][1]["pooled_output"],
            "refiner_positive": refiner_positive[0][0], "handoff": handoff["samples"],
            "refined": refined["samples"], "image": image}


def core_two_stage(base, base_clip, refiner, refiner_clip, vae):
    """ComfyUI's own nodes on the same graph (KSamplerAdvanced pair)."""
    positive = first(CLIPTextEncodeSDXL.execute(base_clip, W, H, 0, 0, W, H, PROMPT, PROMPT))
    negative = first(CLIPTextEncodeSDXL.execute(base_clip, W, H, 0, 0, W, H, NEGATIVE, NEGATIVE))
    latent = comfy_nodes.EmptyLatentImage().generate(W, H, 1)[0]
    handoff = comfy_nodes.KSamplerAdvanced().sample(base, "enable", SEED, STEPS, CFG, "euler", "normal", positive,
                                                    negative, latent, 0, HANDOFF, "enable")[0]
    refiner_positive = first(CLIPTextEncodeSDXLRefiner.execute(refiner_clip, 6.0, W, H, PROMPT))
    refiner_negative = first(CLIPTextEncodeSDXLRefiner.execute(refiner_clip, 2.5, W, H, NEGATIVE))
    refined = comfy_nodes.KSamplerAdvanced().sample(refiner, "disable", SEED, STEPS, CFG, "euler", "normal",
                                                    refiner_positive, refiner_negative, handoff, HANDOFF, 10000,
                                                    "disable")[0]
    image = comfy_nodes.VAEDecode().decode(vae, refined)[0]
    return {"positive": positive[0][0], "handoff": handoff["samples"], "refined": refined["samples"], "image": image}


def diffs(a: dict, b: dict) -> dict:
    return {key: diff(a[key], b[key]) for key in a if key in b}


def pointers(module) -> set:
    """Where each weight of a network lives (its parameters and persistent buffers)."""
    from sdxl_core.checkpoints.shared_weights import named_tensors

    return {t.data_ptr() for t in named_tensors(module).values() if t.numel()}


def error_of(call) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the sentence is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


def case_comfy_in():
    """ComfyUI's CheckpointLoaderSimple -> our text encoders, samplers and VAE == our loader -> the same nodes."""
    base, base_clip, vae = comfy_checkpoint("base")
    refiner, refiner_clip, _ = comfy_checkpoint("refiner")
    ours_base, ours_vae = our_checkpoint("base")
    ours_refiner, _ = our_checkpoint("refiner")
    theirs = our_two_stage(base, base_clip, refiner, refiner_clip, vae)
    ours = our_two_stage(ours_base, ours_base, ours_refiner, ours_refiner, ours_vae)
    loaded = [type(entry.model.model).__name__ for entry in mm.current_loaded_models]
    borrowed = host.core_stage_from_comfy_model(base, "test")
    shared = pointers(borrowed.unet) == pointers(base.model.diffusion_model)
    return {"diffs": diffs(theirs, ours), "loaded": loaded, "unet_shares_comfy_tensors": shared}


def case_comfy_lora():
    """ComfyUI's LoraLoader on MODEL and CLIP -> our nodes, against our own LoRA loader -> our nodes; the MODEL the
    LoRA was applied to is unchanged afterwards (ComfyUI patches a clone and unpatches it for the next load)."""
    base, base_clip, vae = comfy_checkpoint("base")
    refiner, refiner_clip, _ = comfy_checkpoint("refiner")
    plain_before = our_two_stage(base, base_clip, refiner, refiner_clip, vae)
    lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(base, base_clip, "tiny_style.safetensors", 0.8, 0.6)
    ours_base, ours_vae = our_checkpoint("base")
    ours_refiner, _ = our_checkpoint("refiner")
    host.set_standalone_model_folders({"loras": [f"{MODELS}/loras"]})
    (ours_lora,) = node("LoraLoader").apply(ours_base, "tiny_style.safetensors", 0.8, 0.6)
    theirs = our_two_stage(lora_model, lora_clip, refiner, refiner_clip, vae)
    ours = our_two_stage(ours_lora, ours_lora, ours_refiner, ours_refiner, ours_vae)
    plain_after = our_two_stage(base, base_clip, refiner, refiner_clip, vae)
    return {"relative": {key: relative(theirs[key], ours[key]) for key in ("positive", "handoff", "image")},
            "lora_effect": diff(theirs["image"], plain_before["image"]),
            "plain_unchanged": diff(plain_before["image"], plain_after["image"])}


def plain_conditioning(clip, text):
    return first(CLIPTextEncodeSDXL.execute(clip, W, H, 0, 0, W, H, text, text))


def case_comfy_out():
    """Our loader -> SDXL to ComfyUI -> core nodes == core nodes on ComfyUI's own load of the same files."""
    ours_base, ours_vae = our_checkpoint("base")
    ours_refiner, _ = our_checkpoint("refiner")
    base, base_clip, base_vae = node("ToComfy").convert(ours_base)
    refiner, refiner_clip, _ = node("ToComfy").convert(ours_refiner)
    again = node("ToComfy").convert(ours_base)
    theirs = core_two_stage(*comfy_checkpoint("base")[:2], *comfy_checkpoint("refiner")[:2],
                            comfy_checkpoint("base")[2])
    converted = core_two_stage(base, base_clip, refiner, refiner_clip, base_vae)
    ours_text = set()
    for encoder in (ours_base.clip_g, ours_base.clip_l):
        ours_text |= pointers(encoder)
    # ComfyUI's CLIP-L also has a projection SDXL never reads (its checkpoints carry none): the one tensor of its own.
    clip_tensors = pointers(base_clip.cond_stage_model.clip_g.transformer) | \
        pointers(base_clip.cond_stage_model.clip_l.transformer.text_model)
    sharing = {
        "unet": pointers(base.model.diffusion_model) == pointers(ours_base.unet),
        "clip": clip_tensors == ours_text,
        "vae": pointers(base_vae.first_stage_model) == pointers(ours_vae),
    }
    # Our own nodes on the converted model afterwards: ComfyUI's patcher places it, no second patcher appears.
    before = len(mm.current_loaded_models)
    again_ours = our_two_stage(ours_base, ours_base, ours_refiner, ours_refiner, ours_vae)
    fresh_base, fresh_vae = our_checkpoint("base")
    assert fresh_base is ours_base
    kinds = sorted(type(entry.model.model).__name__ for entry in mm.current_loaded_models)
    return {"diffs": diffs(converted, theirs), "sharing": sharing, "same_objects": all(
        a is b for a, b in zip(again, (base, base_clip, base_vae))), "loaded_before": before, "loaded": kinds,
        "ours_after_finite": bool(torch.isfinite(again_ours["image"]).all()),
        "model_size": base.model_size(), "unet_bytes": sum(t.numel() * t.element_size()
                                                           for t in ours_base.unet.parameters())}


def case_release():
    """Once ComfyUI lets go of the outputs, nothing keeps our converted model: no cache, no patcher."""
    import gc
    import weakref

    ours_base = our_checkpoint("base")[0]  # (the loader's VAE output is the model's own)
    model, clip, vae = node("ToComfy").convert(ours_base)
    positive, negative = plain_conditioning(clip, PROMPT), plain_conditioning(clip, NEGATIVE)
    latent = comfy_nodes.EmptyLatentImage().generate(W, H, 1)[0]
    samples = comfy_nodes.KSamplerAdvanced().sample(model, "enable", SEED, 1, CFG, "euler", "normal", positive,
                                                    negative, latent, 0, 1, "disable")[0]
    comfy_nodes.VAEDecode().decode(vae, samples)
    loaded = len(mm.current_loaded_models)
    refs = [weakref.ref(x) for x in (ours_base.unet, ours_base.clip_g, ours_base.vae, model, clip.patcher)]
    del ours_base, model, clip, vae, positive, negative, samples
    gc.collect()
    mm.cleanup_models_gc()
    return {"loaded_while_used": loaded, "alive": [r() is not None for r in refs],
            "loaded_after": len([m for m in mm.current_loaded_models if m.model is not None])}


def case_queue_validation():
    """ComfyUI's own queue-time validation (execution.validate_prompt) of graphs mixing ComfyUI's model types with
    our sockets: the comma-joined types take either, and a type neither side declares is still refused."""
    import asyncio

    import execution

    # As ComfyUI registers a V3 pack (nodes.py load_custom_node): each node of the extension by its schema's id.
    extension = asyncio.run(pack.comfy_entrypoint())
    for node_class in asyncio.run(extension.get_node_list()):
        comfy_nodes.NODE_CLASS_MAPPINGS[node_class.GET_SCHEMA().node_id] = node_class
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sdxl_base.safetensors"}}
    ours = {"class_type": "SDXLTwoStage.CheckpointLoader",
            "inputs": {"ckpt_name": "tiny_sdxl_base.safetensors", "weight_dtype": "default"}}
    save = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}}
    latent = {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}}
    sampler = {"seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal"}
    comfy_into_ours = {
        "1": ckpt, "4": latent, "7": save,
        "2": {"class_type": "SDXLTwoStage.TextEncodeBase",
              "inputs": {"model": ["1", 1], "text_g": PROMPT, "text_l": "", "empty_prompt": "encode"}},
        "3": {"class_type": "SDXLTwoStage.TextEncodeBase",
              "inputs": {"model": ["1", 1], "text_g": NEGATIVE, "text_l": "", "empty_prompt": "encode"}},
        "5": {"class_type": "SDXLTwoStage.BaseSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                         **sampler, "end_at_step": STEPS, "leftover_noise": False, "denoise": 1.0}},
        "6": {"class_type": "SDXLTwoStage.VAEDecode", "inputs": {"vae": ["1", 2], "samples": ["5", 0],
                                                               "tiling": "auto"}},
    }
    ours_into_comfy = {
        "1": ours, "8": {"class_type": "SDXLTwoStage.ToComfy", "inputs": {"model": ["1", 0]}}, "4": latent,
        "7": save,
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["8", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["8", 1], "text": NEGATIVE}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["8", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], **sampler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"vae": ["8", 2], "samples": ["5", 0]}},
    }
    wrong = {**ours_into_comfy, "6": {"class_type": "VAEDecode", "inputs": {"vae": ["1", 1], "samples": ["5", 0]}}}

    def check(prompt):
        valid, error, _, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
        return {"valid": bool(valid), "errors": [e["type"] for entry in node_errors.values()
                                                 for e in entry["errors"]]}

    return {"comfy_into_ours": check(comfy_into_ours), "ours_into_comfy": check(ours_into_comfy),
            "wrong": check(wrong)}


def case_refusals():
    base, base_clip, vae = comfy_checkpoint("base")
    refiner, _, _ = comfy_checkpoint("refiner")
    latent = node("EmptyLatent").generate("custom", W, H, 1)[0]
    positive, negative = plain_conditioning(base_clip, PROMPT), plain_conditioning(base_clip, NEGATIVE)

    def sample(model):
        return node("BaseSampler").sample(model, positive, negative, latent, SEED, STEPS, CFG, "euler", "normal",
                                          STEPS, True, 1.0)

    attention = base.clone()
    attention.set_model_attn1_replace(lambda q, k, v, extra_options: q, "input", 4, 0)
    rescaled = RescaleCFG().patch(base, 0.7)[0]
    last_layer = comfy_nodes.CLIPSetLastLayer().set_last_layer(base_clip, -1)[0]
    return {
        "attention": error_of(lambda: sample(attention)),
        "cfg_function": error_of(lambda: sample(rescaled)),
        "last_layer": error_of(lambda: node("TextEncodeBase").encode(last_layer, PROMPT, "", "encode")),
        "wrong_stage": error_of(lambda: node("RefinerSampler").sample(base, positive, negative, latent, SEED, STEPS,
                                                                       CFG, "euler", "normal", 0, 0.3)),
        "refiner_clip_in_base": error_of(lambda: node("TextEncodeBase").encode(comfy_checkpoint("refiner")[1],
                                                                               PROMPT, "", "encode")),
        "refiner_ok": error_of(lambda: node("RefinerSampler").sample(
            refiner, node("TextEncodeRefiner").encode(comfy_checkpoint("refiner")[1], PROMPT, "encode")[0],
            node("TextEncodeRefiner").encode(comfy_checkpoint("refiner")[1], NEGATIVE, "encode")[0], latent, SEED,
            STEPS, CFG, "euler", "normal", 0, 0.3)),
    }


def case_controlnet():
    """ComfyUI's ControlNetLoader + Apply ControlNet (Advanced) -> our sampler == core KSamplerAdvanced."""
    base, base_clip, _ = comfy_checkpoint("base")
    ours_base, _ = our_checkpoint("base")
    controlnet = comfy_nodes.ControlNetLoader().load_controlnet("tiny_controlnet.safetensors")[0]
    image = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = plain_conditioning(base_clip, PROMPT), plain_conditioning(base_clip, NEGATIVE)
    latent = comfy_nodes.EmptyLatentImage().generate(W, H, 1)[0]
    out = {}
    for label, (strength, start, end) in {"full": (1.0, 0.0, 1.0), "partial": (0.8, 0.1, 0.9)}.items():
        controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, image,
                                                                            strength, start, end)[:2]
        second = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(*controlled, controlnet, image.flip(1),
                                                                        0.5, 0.0, 0.5)[:2]
        for chain, conds in (("one", controlled), ("chained", second)):
            core = comfy_nodes.KSamplerAdvanced().sample(base, "enable", SEED, STEPS, CFG, "euler", "normal", *conds,
                                                         latent, 0, STEPS, "disable")[0]["samples"]
            ours = node("BaseSampler").sample(base, *conds, latent, SEED, STEPS, CFG, "euler", "normal", STEPS, True,
                                              1.0)[0]["samples"]
            our_model = node("BaseSampler").sample(ours_base, *conds, latent, SEED, STEPS, CFG, "euler", "normal",
                                                   STEPS, True, 1.0)[0]["samples"]
            core_on_ours = comfy_nodes.KSamplerAdvanced().sample(node("ToComfy").convert(ours_base)[0], "enable",
                                                                 SEED, STEPS, CFG, "euler", "normal", *conds, latent,
                                                                 0, STEPS, "disable")[0]["samples"]
            out[f"{label}_{chain}"] = {"ours_vs_core": relative(ours, core),
                                       "our_model_vs_core": relative(our_model, core_on_ours),
                                       "same_weights": diff(core_on_ours, core)}
    plain = comfy_nodes.KSamplerAdvanced().sample(base, "enable", SEED, STEPS, CFG, "euler", "normal", positive,
                                                  negative, latent, 0, STEPS, "disable")[0]["samples"]
    controlled = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, controlnet, image, 1.0,
                                                                        0.0, 1.0)[:2]
    ours = node("BaseSampler").sample(base, *controlled, latent, SEED, STEPS, CFG, "euler", "normal", STEPS, True,
                                      1.0)[0]["samples"]
    out["effect"] = diff(ours, plain)
    # The legacy Apply ControlNet: on the positive only, copied to the negative by the sampler.
    legacy = comfy_nodes.ControlNetApply().apply_controlnet(positive, controlnet, image, 0.7)[0]
    core = comfy_nodes.KSamplerAdvanced().sample(base, "enable", SEED, STEPS, CFG, "euler", "normal", legacy,
                                                 negative, latent, 0, STEPS, "disable")[0]["samples"]
    ours_legacy = node("BaseSampler").sample(base, legacy, negative, latent, SEED, STEPS, CFG, "euler", "normal",
                                             STEPS, True, 1.0)[0]["samples"]
    out["legacy"] = {"ours_vs_core": relative(ours_legacy, core), "effect": diff(core, plain)}
    out["cleaned_up"] = controlled[0][0][1]["control"].cond_hint is None
    return out


CASES = {name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")}

for name in CHOSEN or CASES:
    try:
        result = CASES[name]()
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        result = {"error": traceback.format_exc()[-3000:]}
    print(f"CASE {name} {json.dumps(result)}", flush=True)
