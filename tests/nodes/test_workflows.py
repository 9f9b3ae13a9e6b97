"""The example workflows against the node definitions: types exist, links type-check, widget values are valid,
and each UI-format workflow agrees with its API-format twin."""

import json
from pathlib import Path

import pytest

import nodes
from nodes import latent as node_latent
from nodes import sampling as node_sampling

REPO = Path(__file__).resolve().parents[2]
UI_DIR = REPO / "example_workflows"
API_DIR = UI_DIR / "api"
UI_FILES = sorted(UI_DIR.glob("*.json"))  # exactly what ComfyUI's template browser lists (`*/example_workflows/*.json`)
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
# Combos whose options are the files of this machine's model/input folders: any file name is fine in an example.
FILE_COMBOS = {"ckpt_name", "vae_name", "image", "control_net_name"}

# Core ComfyUI nodes the examples may use, with their inputs and outputs (ComfyUI nodes.py, v0.3.64).
CORE_NODES = {
    "SaveImage": {"inputs": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                  "outputs": ()},
    "PreviewImage": {"inputs": {"images": ("IMAGE", {})}, "outputs": ()},
    "LoadImage": {"inputs": {"image": (["example.png"], {"image_upload": True})}, "outputs": ("IMAGE", "MASK")},
    "SetLatentNoiseMask": {"inputs": {"samples": ("LATENT", {}), "mask": ("MASK", {})}, "outputs": ("LATENT",)},
    # comfy_extras/nodes_canny.py
    "Canny": {"inputs": {"image": ("IMAGE", {}),
                         "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
                         "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01})},
              "outputs": ("IMAGE",)},
}


# The checks over several widgets each node runs before its work.
SETTINGS_CHECKS = {nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.EmptyLatent"]: node_latent._check,
                   nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.BaseSampler"]: node_sampling._check_base,
                   nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.RefinerSampler"]: node_sampling._check_refiner}


def _definition(class_type: str) -> dict:
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]
    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    assert cls is not None, f"unknown node type {class_type!r}"
    spec = cls.INPUT_TYPES()
    return {"inputs": {**spec.get("required", {}), **spec.get("optional", {})}, "outputs": cls.RETURN_TYPES,
            "class": cls, "optional": set(spec.get("optional", {}))}


def _is_widget(entry) -> bool:
    return isinstance(entry[0], list) or entry[0] in WIDGET_TYPES


def _check_value(where: str, name: str, entry, value) -> None:
    spec, options = entry[0], entry[1] if len(entry) > 1 else {}
    if isinstance(spec, list):
        if name in FILE_COMBOS:
            assert isinstance(value, str) and value, f"{where}.{name}: a file name, got {value!r}"
        else:
            assert value in spec, f"{where}.{name}: {value!r} is not one of the options"
        return
    kinds = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
    assert isinstance(value, kinds[spec]) and not (spec == "INT" and isinstance(value, bool)), \
        f"{where}.{name}: {value!r} is not a {spec}"
    if spec in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}.{name}: {value} out of range"


def _ui_widget_values(where: str, definition: dict, values: list) -> dict:
    """Name the positional widgets_values the way the frontend lays them out (seed control values in between)."""
    named, position = {}, 0
    for name, entry in definition["inputs"].items():
        if not _is_widget(entry):
            continue
        assert position < len(values), f"{where}: missing widget value for {name}"
        named[name] = values[position]
        position += 1
        options = entry[1] if len(entry) > 1 else {}
        if options.get("control_after_generate"):
            assert values[position] in SEED_CONTROLS, f"{where}.{name}: control value {values[position]!r}"
            position += 1
        if options.get("image_upload"):
            assert values[position] == "image", f"{where}.{name}: upload widget value {values[position]!r}"
            position += 1
    assert position == len(values), f"{where}: {len(values) - position} extra widget values"
    return named


def _check_widgets(where: str, definition: dict, widgets: dict) -> None:
    for name, value in widgets.items():
        _check_value(where, name, definition["inputs"][name], value)
    cls = definition.get("class")
    check = SETTINGS_CHECKS.get(cls)
    if check is not None:
        import inspect

        wanted = inspect.signature(check).parameters
        try:
            check(**{k: v for k, v in widgets.items() if k in wanted})
        except ValueError as error:
            raise AssertionError(f"{where}: {error}") from None


def ui_to_api(workflow: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes from a v0.4 UI workflow (layout dropped)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        definition = _definition(node["type"])
        inputs = _ui_widget_values(f"node {node['id']}", definition, node.get("widgets_values", []))
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, src, src_slot, _, _, _ = links[socket["link"]]
                inputs[socket["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# The template browser shows a pack's template by its file name: readable titles, with short names for the API twins.
TWINS = {"SDXL two-stage text to image": "sdxl_two_stage_txt2img", "SDXL refiner image polish": "sdxl_refiner_img2img",
         "SDXL inpainting": "sdxl_inpaint", "SDXL ControlNet two-stage (canny)": "sdxl_controlnet_two_stage"}
# The files the examples load and where the missing-model dialog may download them from.
DOWNLOADS = {"sd_xl_base_1.0.safetensors": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/",
             "sd_xl_refiner_1.0.safetensors": "https://huggingface.co/stabilityai/stable-diffusion-xl-refiner-1.0/",
             "diffusers_xl_canny_full.safetensors": "https://huggingface.co/lllyasviel/sd_control_collection/"}
# The loader nodes, the widget naming the file each loads, and the models folder it is read from.
MODEL_LOADERS = {"SDXLTwoStage.CheckpointLoader": "checkpoints", "SDXLTwoStage.ControlNetLoader": "controlnet"}


def _api_twin(ui_file: Path) -> Path:
    return API_DIR / f"{TWINS[ui_file.stem]}_api.json"


def test_examples_exist_and_the_template_browser_lists_only_ui_workflows():
    assert {f.stem for f in UI_FILES} == set(TWINS)
    assert not any(f.stem.endswith("_api") for f in UI_FILES)
    assert sorted(API_DIR.glob("*.json")) == sorted(_api_twin(f) for f in UI_FILES)
    # Thumbnails sit beside their workflow under the same name, as the template browser expects.
    assert {f.stem for f in UI_DIR.glob("*.jpg")} == {f.stem for f in UI_FILES}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_ui_workflow_is_valid(ui_file):
    validate_ui_workflow(json.loads(ui_file.read_text()), ui_file.stem)


def validate_ui_workflow(workflow: dict, name: str) -> None:
    assert workflow["version"] == 0.4
    by_id = {node["id"]: node for node in workflow["nodes"]}
    assert len(by_id) == len(workflow["nodes"]) and workflow["last_node_id"] == max(by_id)
    assert workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, type_ in workflow["links"]:
        source, target = by_id[src], by_id[dst]
        produced = _definition(source["type"])["outputs"][src_slot]
        socket = target["inputs"][dst_slot]
        expected = _definition(target["type"])["inputs"][socket["name"]][0]
        assert produced == type_ == expected == socket["type"], f"link {link_id}: {produced} -> {expected}"
        assert socket["link"] == link_id and link_id in source["outputs"][src_slot]["links"]
    for node in workflow["nodes"]:
        definition = _definition(node["type"])
        widgets = _ui_widget_values(f"{name} node {node['id']}", definition, node["widgets_values"])
        _check_widgets(f"{name} node {node['id']}", definition, widgets)
        connected = {socket["name"] for socket in node.get("inputs", []) if socket.get("link") is not None}
        sockets = {name for name, entry in definition["inputs"].items()
                   if not _is_widget(entry) and name not in definition.get("optional", ())}
        assert sockets <= connected, f"node {node['id']} ({node['type']}): unconnected {sockets - connected}"
        for socket in node.get("inputs", []):  # an unconnected socket is an optional one the node has
            assert socket["name"] in definition["inputs"], f"node {node['id']}: no input {socket['name']!r}"
            if socket.get("link") is None:
                assert socket["name"] in definition.get("optional", ()), f"node {node['id']}.{socket['name']}"
        for slot, output in enumerate(node.get("outputs", [])):
            assert output["type"] == definition["outputs"][slot]


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_every_loaded_checkpoint_has_a_download_entry(ui_file):
    """ComfyUI's templates list each model file a node loads under the node's properties.models (and the
    workflow's models), which the frontend's missing-model dialog offers to download into the named folder."""
    workflow = json.loads(ui_file.read_text())
    listed = []
    for node in workflow["nodes"]:
        if node["type"] not in MODEL_LOADERS:
            assert "models" not in node["properties"], node["id"]
            continue
        (entry,) = node["properties"]["models"]
        assert entry["name"] == node["widgets_values"][0] and entry["directory"] == MODEL_LOADERS[node["type"]]
        assert entry["url"].startswith(DOWNLOADS[entry["name"]]) and entry["url"].endswith("/" + entry["name"])
        listed.append(entry)
    assert listed and workflow["models"] == listed


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda p: p.stem)
def test_api_twin_is_valid_and_agrees_with_the_ui_workflow(ui_file):
    prompt = json.loads(_api_twin(ui_file).read_text())
    for node_id, node in prompt.items():
        definition = _definition(node["class_type"])
        # Every input but the optional sockets left unconnected (which the API format leaves out).
        left_out = set(definition["inputs"]) - set(node["inputs"])
        assert set(node["inputs"]) <= set(definition["inputs"]), f"node {node_id}: unknown inputs"
        assert left_out <= {name for name in definition.get("optional", ())
                            if not _is_widget(definition["inputs"][name])}, f"node {node_id}: missing {left_out}"
        widgets = {}
        for name, value in node["inputs"].items():
            entry = definition["inputs"][name]
            if isinstance(value, list):
                assert not _is_widget(entry), f"node {node_id}.{name}: a widget fed by a link"
                src_id, slot = value
                produced = _definition(prompt[src_id]["class_type"])["outputs"][slot]
                assert produced == entry[0], f"node {node_id}.{name}: {produced} into {entry[0]}"
            else:
                widgets[name] = value
        _check_widgets(f"api node {node_id}", definition, widgets)
        assert node["_meta"]["title"]
    expected = ui_to_api(json.loads(ui_file.read_text()))
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()} == expected


def test_validator_catches_a_mistyped_link_and_a_bad_widget():
    """The checks above can fail: a refiner sampler fed an IMAGE, and K > N."""
    workflow = json.loads((UI_DIR / "SDXL two-stage text to image.json").read_text())
    link = next(link for link in workflow["links"] if link[5] == "LATENT")
    link[5] = "IMAGE"
    with pytest.raises(AssertionError, match="link"):
        validate_ui_workflow(workflow, "broken")
    with pytest.raises(AssertionError, match="past the last step"):
        _check_widgets("x", _definition("SDXLTwoStage.RefinerSampler"),
                       {"seed": 0, "steps": 10, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                        "start_at_step": 12, "denoise": 1.0})
    node_sampling._check_refiner(steps=10, start_at_step=10, denoise=1.0)



def test_queue_script_overrides_refuse_unknown_inputs():
    """ComfyUI ignores inputs a node does not have, so a mistyped --set would silently change nothing."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import queue_workflow

    path = Path(__file__).resolve().parents[2] / "example_workflows" / "api" / "sdxl_two_stage_txt2img_api.json"
    prompt = queue_workflow.load_workflow(path, ["7.seed=123", '4.text_g="a fox"', "4.text_l=plain words"])
    assert prompt["7"]["inputs"]["seed"] == 123 and prompt["4"]["inputs"]["text_g"] == "a fox"
    assert prompt["4"]["inputs"]["text_l"] == "plain words"
    with pytest.raises(queue_workflow.WorkflowError, match="node 7 .* has no input 'sed'.*seed"):
        queue_workflow.load_workflow(path, ["7.sed=123"])
    with pytest.raises(queue_workflow.WorkflowError, match="expected NODE.INPUT=VALUE"):
        queue_workflow.load_workflow(path, ["99.seed=1"])
