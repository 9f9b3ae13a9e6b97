"""The pack's core comes from the pack's own folder, and a second installed copy never mixes with the first."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nodes

REPO = Path(__file__).resolve().parents[2]
NODE_COUNT = len(nodes.NODE_CLASS_MAPPINGS)  # every family of the pack, as this process imports it


def _copy_of_the_pack(folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(REPO / "__init__.py", folder / "__init__.py")
    for part in ("nodes", "sdxl_core"):
        shutil.copytree(REPO / part, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def _import_like_comfyui(*packs: Path) -> str:
    """Import each folder as ComfyUI imports a custom node (a package named after its path), in a clean process:
    no PYTHONPATH, so nothing but the pack itself can supply sdxl_core."""
    script = "import importlib.util, logging, sys\nlogging.basicConfig(level=logging.ERROR)\n"
    for index, pack in enumerate(packs):
        script += (
            f"spec = importlib.util.spec_from_file_location('custom_nodes_{index}', {str(pack / '__init__.py')!r})\n"
            f"pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack\n"
            f"spec.loader.exec_module(pack)\n"
            f"print('pack {index}:', len(pack.NODE_CLASS_MAPPINGS))\n")
    script += ("import sdxl_core\nprint('core:', sdxl_core.__file__)\n"
               f"print('on path:', [p for p in sys.path if p in {[str(p) for p in packs]!r}])\n"
               "from sdxl_core.sampling import samplers\nprint('samplers:', samplers.__file__)\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_the_core_is_imported_from_the_packs_own_folder(tmp_path):
    pack = _copy_of_the_pack(tmp_path / "custom_nodes" / "sdxl_two_stage")
    out = _import_like_comfyui(pack)
    assert f"pack 0: {NODE_COUNT}" in out
    assert f"core: {pack / 'sdxl_core' / '__init__.py'}" in out
    assert f"samplers: {pack / 'sdxl_core' / 'sampling' / 'samplers' / '__init__.py'}" in out
    assert "on path: []" in out  # the pack's folder is not put on sys.path


def test_a_second_copy_is_reported_and_loads_nothing(tmp_path):
    first = _copy_of_the_pack(tmp_path / "custom_nodes" / "sdxl_two_stage")
    second = _copy_of_the_pack(tmp_path / "custom_nodes" / "sdxl_two_stage_old")
    out = _import_like_comfyui(first, second)
    assert f"pack 0: {NODE_COUNT}" in out and "pack 1: 0" in out
    assert f"core: {first / 'sdxl_core' / '__init__.py'}" in out
    assert f"the copy of the pack at {second} was not loaded" in out
    assert f"already imported from {first / 'sdxl_core'}" in out
    assert "Keep one copy in custom_nodes" in out
