"""Write example_workflows/: each example graph in ComfyUI's UI format (v0.4, for the template browser) and its
API-format twin (example_workflows/api/, for scripts and POST /prompt), from one description per graph.

Run from the repository root: `python3 scripts/build_example_workflows.py`. tests/nodes/test_workflows.py checks the
files against the node definitions, independently of this script.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "example_workflows"
API_DIR = UI_DIR / "api"
PACK_ID = "sdxl-twostage-nodes"
P = "SDXLTwoStage."

POSITIVE = ("a majestic lighthouse on a rocky coast at sunset, dramatic clouds, golden light, highly detailed "
            "photograph")
NEGATIVE = "blurry, low quality, watermark, text"
BAKED_VAE = "baked into the checkpoint"  # nodes.loaders.BAKED_VAE (this script does not import the pack)
REFINE_POSITIVE = "a detailed photograph, sharp focus, fine texture"

# Where the frontend's missing-model dialog offers to download each checkpoint the examples name (Stability AI's
# releases), and the models folder it goes into.
MODEL_DOWNLOADS = {
    "sd_xl_base_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "sd_xl_refiner_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-refiner-1.0/resolve/main/"
        "sd_xl_refiner_1.0.safetensors",
    # diffusers' SDXL canny ControlNet as one file (lllyasviel's collection of SDXL control models).
    "diffusers_xl_canny_full.safetensors":
        "https://huggingface.co/lllyasviel/sd_control_collection/resolve/main/diffusers_xl_canny_full.safetensors",
}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: list  # widget values in the frontend's order (seed widgets carry their control value after them)
    api_widgets: dict  # the same values by input name, as the API format has them
    inputs: list[tuple[str, str, tuple[int, int]]] = field(default_factory=list)  # (name, type, (src id, slot))
    open_inputs: list[tuple[str, str]] = field(default_factory=list)  # optional sockets left unconnected
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    title: str | None = None
    color: str | None = None
    bgcolor: str | None = None
    models: list[dict] = field(default_factory=list)  # files the node loads, as the templates' `models` entries


def _checkpoint_loader(id, pos, name, title):
    return Node(id, P + "CheckpointLoader", pos, (380, 150), [name, "default", BAKED_VAE],
                {"ckpt_name": name, "weight_dtype": "default", "vae_name": BAKED_VAE},
                outputs=[("model", "SDXL_MODEL"), ("vae", "SDXL_VAE")], title=title,
                models=[{"name": name, "url": MODEL_DOWNLOADS[name], "directory": "checkpoints"}])


def _base_encode(id, pos, model, text, title, color):
    return Node(id, P + "TextEncodeBase", pos, (400, 275), [text, "", "encode"],
                {"text_g": text, "text_l": "", "empty_prompt": "encode"}, inputs=[("model", "SDXL_MODEL", model)],
                outputs=[("CONDITIONING", "CONDITIONING")], title=title, **color)


def _refiner_encode(id, pos, model, text, title, color):
    return Node(id, P + "TextEncodeRefiner", pos, (400, 265), [text, "encode"],
                {"text": text, "empty_prompt": "encode"}, inputs=[("model", "SDXL_MODEL", model)],
                outputs=[("CONDITIONING", "CONDITIONING")], title=title, **color)


GREEN = {"color": "#232", "bgcolor": "#353"}
RED = {"color": "#322", "bgcolor": "#533"}
NO_COLOR = {}


def txt2img() -> tuple[list[Node], list[dict]]:
    steps, handoff, seed, cfg = 25, 20, 42, 7.0
    nodes = [
        _checkpoint_loader(1, (20, 80), "sd_xl_base_1.0.safetensors", "Load SDXL Base"),
        _checkpoint_loader(2, (20, 800), "sd_xl_refiner_1.0.safetensors", "Load SDXL Refiner"),
        Node(3, P + "EmptyLatent", (20, 290), (380, 150), ["1024x1024 (1:1)", 1024, 1024, 1],
             {"resolution": "1024x1024 (1:1)", "width": 1024, "height": 1024, "batch_size": 1},
             outputs=[("latent", "LATENT"), ("width", "INT"), ("height", "INT")]),
        _base_encode(4, (440, 80), (1, 0), POSITIVE, "Positive (base)", GREEN),
        _base_encode(5, (440, 400), (1, 0), NEGATIVE, "Negative (base)", RED),
        Node(6, P + "MicroConditioning", (880, 80), (340, 230), [1024, 1024, 0, 0, 1024, 1024],
             {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024},
             inputs=[("conditioning", "CONDITIONING", (4, 0))], outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(7, P + "BaseSampler", (1260, 80), (340, 330),
             [seed, "fixed", steps, cfg, "euler", "normal", handoff, True, 1.0],
             {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
              "end_at_step": handoff, "leftover_noise": True, "denoise": 1.0},
             inputs=[("model", "SDXL_MODEL", (1, 0)), ("positive", "CONDITIONING", (6, 0)),
                     ("negative", "CONDITIONING", (5, 0)), ("latent_image", "LATENT", (3, 0))],
             outputs=[("LATENT", "LATENT")]),
        _refiner_encode(8, (440, 800), (2, 0), POSITIVE, "Positive (refiner)", GREEN),
        _refiner_encode(9, (440, 1110), (2, 0), NEGATIVE, "Negative (refiner)", RED),
        Node(10, P + "AestheticScore", (880, 1110), (340, 82), [2.5], {"aesthetic_score": 2.5},
             inputs=[("conditioning", "CONDITIONING", (9, 0))], outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(11, P + "RefinerSampler", (1260, 800), (340, 310),
             [seed, "fixed", steps, cfg, "euler", "normal", handoff, 1.0],
             {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
              "start_at_step": handoff, "denoise": 1.0},
             inputs=[("model", "SDXL_MODEL", (2, 0)), ("positive", "CONDITIONING", (8, 0)),
                     ("negative", "CONDITIONING", (10, 0)), ("latent_image", "LATENT", (7, 0))],
             outputs=[("LATENT", "LATENT")]),
        Node(12, P + "VAEDecode", (1660, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (1, 1)), ("samples", "LATENT", (11, 0))], outputs=[("IMAGE", "IMAGE")]),
        Node(13, "SaveImage", (1660, 220), (520, 560), ["sdxl_two_stage"], {"filename_prefix": "sdxl_two_stage"},
             inputs=[("images", "IMAGE", (12, 0))]),
    ]
    groups = [
        {"title": "Base: steps 0..K (K = end_at_step)", "bounding": [0, 0, 1620, 700], "color": "#3f789e"},
        {"title": "Refiner: steps K..N, its own text encode", "bounding": [0, 720, 1620, 680], "color": "#8A8"},
    ]
    return nodes, groups


def img2img_refine() -> tuple[list[Node], list[dict]]:
    steps, denoise, seed, cfg = 20, 0.25, 7, 7.0
    nodes = [
        Node(1, "LoadImage", (20, 80), (320, 330), ["example.png", "image"], {"image": "example.png"},
             outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
        _checkpoint_loader(2, (20, 460), "sd_xl_refiner_1.0.safetensors", "Load SDXL Refiner"),
        Node(3, P + "VAEEncode", (440, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (2, 1)), ("pixels", "IMAGE", (1, 0))], outputs=[("LATENT", "LATENT")]),
        _refiner_encode(4, (440, 220), (2, 0), REFINE_POSITIVE, "Positive (refiner)", GREEN),
        _refiner_encode(5, (440, 550), (2, 0), NEGATIVE, "Negative (refiner)", RED),
        Node(6, P + "RefinerSampler", (880, 80), (340, 310),
             [seed, "fixed", steps, cfg, "euler", "normal", 0, denoise],
             {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
              "start_at_step": 0, "denoise": denoise},
             inputs=[("model", "SDXL_MODEL", (2, 0)), ("positive", "CONDITIONING", (4, 0)),
                     ("negative", "CONDITIONING", (5, 0)), ("latent_image", "LATENT", (3, 0))],
             outputs=[("LATENT", "LATENT")]),
        Node(7, P + "VAEDecode", (1260, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (2, 1)), ("samples", "LATENT", (6, 0))], outputs=[("IMAGE", "IMAGE")]),
        Node(8, "SaveImage", (1260, 220), (520, 560), ["sdxl_refined"], {"filename_prefix": "sdxl_refined"},
             inputs=[("images", "IMAGE", (7, 0))]),
    ]
    return nodes, []


def _base_sampler(id, pos, model, positive, negative, latent, steps, end_at_step, seed, cfg):
    return Node(id, P + "BaseSampler", pos, (340, 330),
                [seed, "fixed", steps, cfg, "euler", "normal", end_at_step, True, 1.0],
                {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                 "end_at_step": end_at_step, "leftover_noise": True, "denoise": 1.0},
                inputs=[("model", "SDXL_MODEL", model), ("positive", "CONDITIONING", positive),
                        ("negative", "CONDITIONING", negative), ("latent_image", "LATENT", latent)],
                outputs=[("LATENT", "LATENT")])


INPAINT_POSITIVE = "a weathered wooden rowing boat on the shore, highly detailed photograph"


def inpaint() -> tuple[list[Node], list[dict]]:
    """Repaint the part of a picture painted over in the mask editor: the base samples only there (ComfyUI's
    SetLatentNoiseMask), keeping the rest of the latent."""
    steps, seed, cfg = 25, 3, 7.0
    nodes = [
        _checkpoint_loader(1, (20, 80), "sd_xl_base_1.0.safetensors", "Load SDXL Base"),
        Node(2, "LoadImage", (20, 290), (340, 380), ["example.png", "image"], {"image": "example.png"},
             outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
             title="Picture (paint the mask in MaskEditor)"),
        Node(3, P + "VAEEncode", (440, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (1, 1)), ("pixels", "IMAGE", (2, 0))], outputs=[("LATENT", "LATENT")]),
        Node(4, "SetLatentNoiseMask", (440, 220), (260, 50), [], {},
             inputs=[("samples", "LATENT", (3, 0)), ("mask", "MASK", (2, 1))], outputs=[("LATENT", "LATENT")],
             title="Repaint only the masked part"),
        _base_encode(5, (440, 330), (1, 0), INPAINT_POSITIVE, "Positive: what goes in the masked part", GREEN),
        _base_encode(6, (440, 650), (1, 0), NEGATIVE, "Negative (base)", RED),
        _base_sampler(7, (880, 80), (1, 0), (5, 0), (6, 0), (4, 0), steps, steps, seed, cfg),
        Node(8, P + "VAEDecode", (1260, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (1, 1)), ("samples", "LATENT", (7, 0))], outputs=[("IMAGE", "IMAGE")]),
        Node(9, "SaveImage", (1260, 220), (520, 560), ["sdxl_inpaint"], {"filename_prefix": "sdxl_inpaint"},
             inputs=[("images", "IMAGE", (8, 0))]),
    ]
    return nodes, []


CONTROL_POSITIVE = "a lighthouse on a rocky coast at dusk, oil painting, rich colours"


def controlnet() -> tuple[list[Node], list[dict]]:
    """The two-stage text to image with a canny ControlNet on the base: edges from a picture fix the layout, the
    refiner finishes without it (SDXL ControlNets are trained for the base)."""
    steps, handoff, seed, cfg = 25, 20, 42, 7.0
    strength, start, end = 0.7, 0.0, 0.8
    nodes = [
        _checkpoint_loader(1, (20, 80), "sd_xl_base_1.0.safetensors", "Load SDXL Base"),
        _checkpoint_loader(2, (20, 1080), "sd_xl_refiner_1.0.safetensors", "Load SDXL Refiner"),
        Node(3, P + "EmptyLatent", (20, 290), (380, 150), ["1024x1024 (1:1)", 1024, 1024, 1],
             {"resolution": "1024x1024 (1:1)", "width": 1024, "height": 1024, "batch_size": 1},
             outputs=[("latent", "LATENT"), ("width", "INT"), ("height", "INT")]),
        _base_encode(4, (440, 80), (1, 0), CONTROL_POSITIVE, "Positive (base)", GREEN),
        _base_encode(5, (440, 400), (1, 0), NEGATIVE, "Negative (base)", RED),
        Node(6, P + "MicroConditioning", (880, 80), (340, 230), [1024, 1024, 0, 0, 1024, 1024],
             {"width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024, "target_height": 1024},
             inputs=[("conditioning", "CONDITIONING", (4, 0))], outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(7, "LoadImage", (20, 520), (340, 380), ["example.png", "image"], {"image": "example.png"},
             outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")], title="Picture whose edges set the layout"),
        Node(8, "Canny", (440, 720), (340, 82), [0.4, 0.8], {"low_threshold": 0.4, "high_threshold": 0.8},
             inputs=[("image", "IMAGE", (7, 0))], outputs=[("IMAGE", "IMAGE")]),
        Node(9, P + "ControlNetLoader", (440, 860), (400, 82), ["diffusers_xl_canny_full.safetensors", "default"],
             {"control_net_name": "diffusers_xl_canny_full.safetensors", "weight_dtype": "default"},
             outputs=[("control_net", "SDXL_CONTROL_NET")], title="Load SDXL ControlNet (canny)",
             models=[{"name": "diffusers_xl_canny_full.safetensors",
                      "url": MODEL_DOWNLOADS["diffusers_xl_canny_full.safetensors"], "directory": "controlnet"}]),
        Node(10, P + "ApplyControlNet", (880, 400), (340, 190), [strength, start, end],
             {"strength": strength, "start_percent": start, "end_percent": end},
             inputs=[("positive", "CONDITIONING", (6, 0)), ("negative", "CONDITIONING", (5, 0)),
                     ("control_net", "SDXL_CONTROL_NET", (9, 0)), ("image", "IMAGE", (8, 0))],
             open_inputs=[("vae", "SDXL_VAE")], outputs=[("positive", "CONDITIONING"), ("negative", "CONDITIONING")]),
        _base_sampler(11, (1260, 80), (1, 0), (10, 0), (10, 1), (3, 0), steps, handoff, seed, cfg),
        _refiner_encode(12, (440, 1080), (2, 0), CONTROL_POSITIVE, "Positive (refiner)", GREEN),
        _refiner_encode(13, (440, 1390), (2, 0), NEGATIVE, "Negative (refiner)", RED),
        Node(14, P + "AestheticScore", (880, 1390), (340, 82), [2.5], {"aesthetic_score": 2.5},
             inputs=[("conditioning", "CONDITIONING", (13, 0))], outputs=[("CONDITIONING", "CONDITIONING")]),
        Node(15, P + "RefinerSampler", (1260, 1080), (340, 310),
             [seed, "fixed", steps, cfg, "euler", "normal", handoff, 1.0],
             {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
              "start_at_step": handoff, "denoise": 1.0},
             inputs=[("model", "SDXL_MODEL", (2, 0)), ("positive", "CONDITIONING", (12, 0)),
                     ("negative", "CONDITIONING", (14, 0)), ("latent_image", "LATENT", (11, 0))],
             outputs=[("LATENT", "LATENT")]),
        Node(16, P + "VAEDecode", (1660, 80), (260, 80), ["auto"], {"tiling": "auto"},
             inputs=[("vae", "SDXL_VAE", (1, 1)), ("samples", "LATENT", (15, 0))], outputs=[("IMAGE", "IMAGE")]),
        Node(17, "SaveImage", (1660, 220), (520, 560), ["sdxl_controlnet"], {"filename_prefix": "sdxl_controlnet"},
             inputs=[("images", "IMAGE", (16, 0))]),
    ]
    groups = [
        {"title": "Base with a canny ControlNet: steps 0..K", "bounding": [0, 0, 1620, 1000], "color": "#3f789e"},
        {"title": "Refiner: steps K..N, no ControlNet", "bounding": [0, 1000, 1620, 680], "color": "#8A8"},
    ]
    return nodes, groups


def _order(nodes: list[Node]) -> dict[int, int]:
    """Execution order (a topological order), which the frontend stores per node."""
    done: dict[int, int] = {}
    by_id = {n.id: n for n in nodes}

    def visit(node: Node) -> None:
        if node.id in done:
            return
        for _, _, (src, _) in node.inputs:
            visit(by_id[src])
        done[node.id] = len(done)

    for node in nodes:
        visit(node)
    return done


def to_ui(nodes: list[Node], groups: list[dict]) -> dict:
    links = []
    out_links: dict[tuple[int, int], list[int]] = {}
    in_links: dict[tuple[int, str], int] = {}
    for node in nodes:
        for slot, (name, type_, (src, src_slot)) in enumerate(node.inputs):
            link_id = len(links) + 1
            links.append([link_id, src, src_slot, node.id, slot, type_])
            out_links.setdefault((src, src_slot), []).append(link_id)
            in_links[(node.id, name)] = link_id
    order = _order(nodes)
    ui_nodes = []
    for node in nodes:
        entry = {
            "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
            "order": order[node.id], "mode": 0,
            "inputs": [{"name": name, "type": type_, "link": in_links[(node.id, name)]}
                       for name, type_, _ in node.inputs]
                      + [{"name": name, "type": type_, "shape": 7, "link": None} for name, type_ in node.open_inputs],
            "outputs": [{"name": name, "type": type_, "links": out_links.get((node.id, slot), []),
                         "slot_index": slot} for slot, (name, type_) in enumerate(node.outputs)],
            "properties": {"Node name for S&R": node.type,
                           "cnr_id": PACK_ID if node.type.startswith(P) else "comfy-core",
                           **({"models": node.models} if node.models else {})},
            "widgets_values": node.widgets,
        }
        for key in ("title", "color", "bgcolor"):
            if getattr(node, key) is not None:
                entry[key] = getattr(node, key)
        ui_nodes.append(entry)
    models = [model for node in nodes for model in node.models]
    return {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [{"id": i + 1, "font_size": 24, "flags": {}, **g} for i, g in enumerate(groups)],
            "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [40, 40]}}, "version": 0.4,
            "models": models}


def to_api(nodes: list[Node]) -> dict:
    prompt = {}
    for node in nodes:
        inputs = dict(node.api_widgets)
        for name, _, (src, slot) in node.inputs:
            inputs[name] = [str(src), slot]
        prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs,
                                "_meta": {"title": node.title or node.type.removeprefix(P)}}
    return prompt


# API name -> (template title, graph). The template browser shows a pack's template by its file name, so the UI
# file (and its .jpg thumbnail) carries the readable title; scripts use the API twin's short name.
EXAMPLES = {
    "sdxl_two_stage_txt2img": ("SDXL two-stage text to image", txt2img),
    "sdxl_refiner_img2img": ("SDXL refiner image polish", img2img_refine),
    "sdxl_inpaint": ("SDXL inpainting", inpaint),
    "sdxl_controlnet_two_stage": ("SDXL ControlNet two-stage (canny)", controlnet),
}


def main() -> None:
    API_DIR.mkdir(parents=True, exist_ok=True)
    for name, (title, build) in EXAMPLES.items():
        nodes, groups = build()
        (UI_DIR / f"{title}.json").write_text(json.dumps(to_ui(nodes, groups), indent=2) + "\n")
        (API_DIR / f"{name}_api.json").write_text(json.dumps(to_api(nodes), indent=2) + "\n")
        print(f"wrote {title}.json and api/{name}_api.json")


if __name__ == "__main__":
    main()
