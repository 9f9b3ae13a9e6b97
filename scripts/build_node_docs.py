"""Write the node help pages (web/js/docs/<NodeId>.md) and the English node locale (locales/en/nodeDefs.json)
from the node definitions, so neither can drift from what the nodes say about themselves.

The frontend shows `/extensions/<pack>/docs/<NodeId>.md` in the node library's help panel, and ComfyUI serves every
pack's `locales/<lang>/nodeDefs.json` to it (display names, input names, tooltips). The Chinese locale,
locales/zh/nodeDefs.json, is translated by hand from the English one; tests/nodes/test_node_docs.py checks that
this script's output is what is committed and that the Chinese file covers the same nodes, inputs and outputs.

Run from the repository root: `PYTHONPATH=. python3 scripts/build_node_docs.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = ROOT / "web" / "js" / "docs"
LOCALES_DIR = ROOT / "locales"


def _inputs(node_class: type) -> dict:
    spec = node_class.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def _options(entry: tuple) -> dict:
    return entry[1] if len(entry) > 1 else {}


def _kind(entry: tuple) -> str:
    spec = entry[0]
    if isinstance(spec, (list, tuple)):
        return "choice"
    return str(spec)


def _output_names(node_class: type) -> tuple:
    return getattr(node_class, "RETURN_NAMES", None) or node_class.RETURN_TYPES


def node_defs(mappings: dict, display_names: dict) -> dict:
    """The nodeDefs.json entries ComfyUI's frontend reads: per node id its display name, description, inputs by
    name (shown name and tooltip) and outputs by slot index."""
    defs = {}
    for node_id, node_class in sorted(mappings.items()):
        inputs = {}
        for name, entry in _inputs(node_class).items():
            inputs[name] = {"name": name}
            if _options(entry).get("tooltip"):
                inputs[name]["tooltip"] = _options(entry)["tooltip"]
        tooltips = getattr(node_class, "OUTPUT_TOOLTIPS", ())
        outputs = {}
        for slot, name in enumerate(_output_names(node_class)):
            outputs[str(slot)] = {"name": name}
            if slot < len(tooltips):
                outputs[str(slot)]["tooltip"] = tooltips[slot]
        defs[node_id] = {"display_name": display_names[node_id], "description": node_class.DESCRIPTION,
                         "inputs": inputs, "outputs": outputs}
    return defs


def _default(entry: tuple) -> str:
    options = _options(entry)
    if "default" in options:
        return f"`{options['default']}`"
    if isinstance(entry[0], (list, tuple)) and entry[0]:
        return f"`{entry[0][0]}`"
    return ""


def help_page(node_id: str, node_class: type, display_name: str) -> str:
    """The Markdown help page of one node: what it does, then its inputs and outputs as tables."""
    lines = [f"# {display_name}", "", node_class.DESCRIPTION, "", f"Node id `{node_id}`, category "
             f"`{node_class.CATEGORY}`.", "", "## Inputs", "", "| input | type | default | what it does |",
             "|---|---|---|---|"]
    for name, entry in _inputs(node_class).items():
        options = _options(entry)
        kind = _kind(entry)
        if kind in ("INT", "FLOAT") and ("min" in options or "max" in options):
            kind += f" ({options.get('min', '')}..{options.get('max', '')})"
        tooltip = options.get("tooltip", "").replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {_default(entry)} | {tooltip} |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "|---|---|---|"]
    tooltips = getattr(node_class, "OUTPUT_TOOLTIPS", ())
    for slot, (name, type_) in enumerate(zip(_output_names(node_class), node_class.RETURN_TYPES)):
        tooltip = tooltips[slot].replace("|", "\\|") if slot < len(tooltips) else ""
        lines.append(f"| `{name}` | {type_} | {tooltip} |")
    lines += ["", "The pack's example workflows (Browse Templates, under the pack's folder name) show it wired up; "
              "docs/comfyui.md in the pack explains the two-stage setup.", ""]
    return "\n".join(lines)


def expected_files() -> dict[Path, str]:
    """Every generated file and its content."""
    import nodes

    files = {}
    for node_id, node_class in nodes.NODE_CLASS_MAPPINGS.items():
        files[DOCS_DIR / f"{node_id}.md"] = help_page(node_id, node_class, nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id])
    defs = node_defs(nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS)
    files[LOCALES_DIR / "en" / "nodeDefs.json"] = json.dumps(defs, indent=2, ensure_ascii=False) + "\n"
    return files


def main() -> None:
    sys.path.insert(0, str(ROOT))
    for path, content in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
