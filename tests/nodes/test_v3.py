"""The pack as ComfyUI's V3 schema states it (nodes/v3.py), read by ComfyUI's own comfy_api.

Each check runs in ComfyUI's interpreter (COMFYUI_PYTHON), with the pack loaded as ComfyUI's node loader loads it.
The real server runs the same V3 nodes in tests/nodes/test_comfyui_integration.py.
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

_LOAD = f"""
import asyncio, json, logging, sys
sys.path.insert(0, {COMFYUI!r})
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import nodes as comfy_nodes
logging.disable(logging.WARNING)
before = set(comfy_nodes.NODE_CLASS_MAPPINGS)
loaded = asyncio.run(comfy_nodes.load_custom_node({str(REPO)!r}, module_parent="custom_nodes"))
ours = {{name: cls for name, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items() if name not in before}}
pack = sys.modules[[name for name in sys.modules if name.endswith("nodes.v3")][0].rsplit(".", 2)[0]]
declared = sys.modules[pack.__name__ + ".nodes"].NODE_CLASS_MAPPINGS
"""


def _in_comfyui(code: str) -> str:
    result = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), "-c", _LOAD + code], cwd=COMFYUI,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _v1_as_v3(spec):
    """A V1 input declaration as V3 writes it: combos as ("COMBO", {"options": ...}), hidden as 1-tuples."""
    kind, options = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    if isinstance(kind, list):
        return ["COMBO", {**options, "options": kind, "multiselect": False}]
    return [kind, options]


def test_comfyui_registers_every_node_as_v3_with_the_same_ids_inputs_and_outputs():
    out = _in_comfyui("""
from comfy_api.internal import _ComfyNodeInternal
print(json.dumps({
    "loaded": loaded, "v1_mappings_exposed": hasattr(pack, "NODE_CLASS_MAPPINGS"),
    "all_v3": all(issubclass(cls, _ComfyNodeInternal) for cls in ours.values()),
    "ids": sorted(ours), "declared_ids": sorted(declared),
    "display": {name: comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[name] for name in ours},
    "info": {name: cls.GET_NODE_INFO_V1() for name, cls in ours.items()},
    "declared": {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES),
                        "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
                        "output_tooltips": list(cls.OUTPUT_TOOLTIPS), "description": cls.DESCRIPTION,
                        "category": cls.CATEGORY} for name, cls in declared.items()},
}, default=list))
""")
    facts = json.loads(out.splitlines()[-1])
    assert facts["loaded"] and facts["all_v3"] and not facts["v1_mappings_exposed"]
    assert facts["ids"] == facts["declared_ids"] and len(facts["ids"]) >= 12
    import nodes

    assert facts["display"] == nodes.NODE_DISPLAY_NAME_MAPPINGS
    for name, info in facts["info"].items():
        declared = facts["declared"][name]
        for section in ("required", "optional"):
            want = {key: _v1_as_v3(spec) for key, spec in declared["input"].get(section, {}).items()}
            assert info["input"].get(section, {}) == want, (name, section)
            # Widget values in saved workflows are positional: the order must not change either.
            assert info["input_order"].get(section, []) == list(declared["input"].get(section, {})), name
        want_hidden = {key: [value] for key, value in declared["input"].get("hidden", {}).items()}
        assert info["input"].get("hidden", {}) == want_hidden, name
        for key in ("output", "output_name", "output_tooltips", "description", "category"):
            assert info[key] == declared[key], (name, key)
        assert info["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


def test_v3_checks_keep_their_signature_so_comfyui_reports_each_sentence_once():
    """ComfyUI skips its own range check, and repeats a check's sentence, for each input the check names: the V3
    check must name exactly the inputs the declared one names."""
    out = _in_comfyui("""
import inspect
from comfy_api.internal import first_real_override
signatures = {}
for name, cls in ours.items():
    check, v1 = first_real_override(cls, "validate_inputs"), getattr(declared[name], "VALIDATE_INPUTS", None)
    signatures[name] = [None if f is None else inspect.getfullargspec(f).args for f in (check, v1)]
nan = ours["SDXLTwoStage.BaseSampler"].validate_inputs(cfg=float("nan"))
print(json.dumps({"signatures": signatures, "nan": nan}))
""")
    facts = json.loads(out.splitlines()[-1])
    for name, (v3_args, v1_args) in facts["signatures"].items():
        assert v3_args == v1_args, name
    assert facts["signatures"]["SDXLTwoStage.BaseSampler"][0] == ["cls", "cfg"]
    assert facts["nan"].startswith("cfg must be a finite number")


def test_execute_runs_the_node_on_a_fresh_object_and_keeps_nothing_on_the_class(tiny_checkpoints, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "base.safetensors").symlink_to(tiny_checkpoints["base"])
    out = _in_comfyui(f"""
import folder_paths
folder_paths.add_model_folder_path("checkpoints", {str(checkpoints)!r})
loader, empty = ours["SDXLTwoStage.CheckpointLoader"], ours["SDXLTwoStage.EmptyLatent"]
before = dict(vars(loader))
model = loader.PREPARE_CLASS_CLONE({{}}).EXECUTE_NORMALIZED(ckpt_name="base.safetensors", weight_dtype="fp32")
latent = empty.PREPARE_CLASS_CLONE({{}}).EXECUTE_NORMALIZED(resolution="custom", width=64, height=96, batch_size=2)
print(json.dumps({{"output": type(model).__name__, "model": type(model.args[0]).__name__,
                  "kind": model.args[0].kind, "size": list(latent.args[1:]),
                  "shape": list(latent.args[0]["samples"].shape), "class_unchanged": dict(vars(loader)) == before}}))
""")
    facts = json.loads(out.splitlines()[-1])
    assert facts == {"output": "NodeOutput", "model": "SDXLModel", "kind": "base", "size": [64, 96],
                     "shape": [2, 4, 12, 8], "class_unchanged": True}
