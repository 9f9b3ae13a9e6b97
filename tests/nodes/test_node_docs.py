"""The node help pages and locales against the node definitions: the generated files are what
scripts/build_node_docs.py makes now, and the hand-translated Chinese locale covers exactly the same nodes, inputs
and outputs, in Chinese."""

import json
import re
import sys
from pathlib import Path

import pytest

import nodes

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import build_node_docs  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_help_pages_and_english_locale_are_what_the_node_definitions_give():
    expected = build_node_docs.expected_files()
    stale = [str(path.relative_to(REPO)) for path, content in expected.items()
             if not path.is_file() or path.read_text(encoding="utf-8") != content]
    assert not stale, f"regenerate with `PYTHONPATH=. python3 scripts/build_node_docs.py`: {stale}"
    pages = {p.stem for p in build_node_docs.DOCS_DIR.glob("*.md")}
    assert pages == set(nodes.NODE_CLASS_MAPPINGS)  # one page per node, none for a node that is gone


def test_help_page_names_every_input_and_output():
    page = (build_node_docs.DOCS_DIR / "SDXLTwoStage.BaseSampler.md").read_text()
    for name in ("end_at_step", "leftover_noise", "denoise", "seed"):
        assert f"| `{name}` |" in page
    assert "| `LATENT` | LATENT |" in page and page.startswith("# SDXL Base Sampler")


def _shape(defs: dict) -> dict:
    return {node: (sorted(entry["inputs"]), sorted(entry["outputs"])) for node, entry in defs.items()}


def test_chinese_locale_covers_the_same_nodes_inputs_and_outputs():
    english = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    chinese = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert _shape(chinese) == _shape(english)
    for node, entry in chinese.items():
        assert CJK.search(entry["display_name"]) and CJK.search(entry["description"]), node
        for kind in ("inputs", "outputs"):
            for name, item in entry[kind].items():
                assert item["name"], f"{node} {kind} {name}"
                has_tooltip = "tooltip" in english[node][kind][name]
                assert ("tooltip" in item) == has_tooltip, f"{node} {kind} {name}"
                if has_tooltip:
                    assert CJK.search(item["tooltip"]), f"{node} {kind} {name}: not translated"


@pytest.mark.parametrize("node_id", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_locale_entries_match_the_definition(node_id):
    english = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))[node_id]
    assert english["display_name"] == nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    assert len(english["outputs"]) == len(cls.RETURN_TYPES)
