"""The web extension: its node tests (`node --test tests/web/`) and its agreement with the Python side."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import nodes
from sdxl_core.buckets import SDXL_BUCKETS

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "web" / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (>= 18) is needed for the web tests")


@needs_node
def test_node_test_runner_passes():
    result = subprocess.run([NODE, "--test", "tests/web/"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"^# fail 0$", result.stdout, re.M) and not re.search(r"^# pass 0$", result.stdout, re.M)


@needs_node
def test_js_reads_every_bucket_label_the_server_sends():
    labels = nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.EmptyLatent"].INPUT_TYPES()["required"]["resolution"][0]
    script = (f"import('{(WEB / 'sdxl_buckets.js').as_uri()}').then(m => console.log(JSON.stringify("
              f"{json.dumps(labels)}.map(m.parseBucketLabel))))")
    result = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert parsed[0] is None  # "custom"
    assert parsed[1:] == [{"width": b.width, "height": b.height} for b in SDXL_BUCKETS]


def test_js_constants_match_the_node_definitions():
    source = (WEB / "sdxl_buckets.js").read_text()
    defaults = json.loads(re.sub(r"(\w+):", r'"\1":', re.search(r"MICRO_DEFAULTS = (\{[^}]*\})", source).group(1)))
    inputs = nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.MicroConditioning"].INPUT_TYPES()["required"]
    assert defaults == {name: inputs[name][1]["default"] for name in defaults}
    for name in ("EMPTY_LATENT", "MICRO_CONDITIONING"):
        node_id = re.search(rf'{name} = "([^"]+)"', source).group(1)
        assert node_id in nodes.NODE_CLASS_MAPPINGS
    latent_inputs = nodes.NODE_CLASS_MAPPINGS["SDXLTwoStage.EmptyLatent"].INPUT_TYPES()["required"]
    assert {"resolution", "width", "height"} <= set(latent_inputs)


def test_extension_is_served_where_its_relative_import_resolves():
    """ComfyUI serves WEB_DIRECTORY at /extensions/<pack>/, so `../../scripts/app.js` must be one level down."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pack_for_web_test", REPO / "__init__.py")
    source = (REPO / "__init__.py").read_text()
    web_directory = re.search(r'^WEB_DIRECTORY = "([^"]+)"', source, re.M).group(1)
    assert spec is not None and (REPO / web_directory).resolve() == WEB
    extension = (WEB / "sdxl_two_stage.js").read_text()
    assert 'from "../../scripts/app.js"' in extension
    assert "./sdxl_buckets.js" in extension
