"""What the Comfy registry and ComfyUI-Manager read: the install dependencies (torch never among them, the same
list in pyproject.toml and requirements.txt), the license, the icon, what the published archive leaves out, and the
publish workflow."""

import fnmatch
import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_names(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower()
            found[name] = line.replace(" ", "")
    return found


def test_install_dependencies_leave_torch_alone_and_agree_with_requirements_txt():
    declared = _requirement_names(PYPROJECT["project"]["dependencies"])
    required = _requirement_names((REPO / "requirements.txt").read_text().splitlines())
    assert "torch" not in declared and "torch" not in required
    assert declared == required
    assert {"transformers", "safetensors", "pillow", "numpy"} <= set(declared)


def test_license_file_is_the_declared_mit_license():
    assert PYPROJECT["project"]["license"] == {"file": "LICENSE"}
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


def test_registry_metadata_and_icon():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    repository = PYPROJECT["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert comfy["Icon"].startswith(prefix)
    icon = REPO / comfy["Icon"].removeprefix(prefix)
    svg = icon.read_text()
    width, height = (int(re.search(rf'{side}="(\d+)"', svg).group(1)) for side in ("width", "height"))
    assert width == height <= 400


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if pattern.rstrip("/") in parts[:-1]:
                return True
        elif any(fnmatch.fnmatch(part, pattern) for part in parts):
            return True
    return False


def test_comfyignore_keeps_what_comfyui_loads_and_drops_the_developer_files():
    patterns = [line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for kept in ("__init__.py", "nodes/sampling.py", "sdxl_core/pipeline.py", "web/js/sdxl_two_stage.js",
                 "web/js/docs/SDXLTwoStage.BaseSampler.md", "locales/zh/nodeDefs.json", "LICENSE",
                 "example_workflows/api/sdxl_two_stage_txt2img_api.json", "requirements.txt", "pyproject.toml"):
        assert not _ignored(kept, patterns), kept
    for dropped in ("tests/conftest.py", "benchmarks/bench_sdxl.py", ".ci/run", ".github/workflows/publish.yml",
                    "model.safetensors"):
        assert _ignored(dropped, patterns), dropped


def test_publish_workflow_uses_the_registry_action_with_its_secret():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    publish = next(step for step in steps if str(step.get("uses", "")).startswith("Comfy-Org/publish-node-action@"))
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads a bare `on` as True
    assert "pyproject.toml" in triggers["push"]["paths"]
