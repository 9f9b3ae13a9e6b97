"""README.md's sampler and scheduler lists are the registries' (scripts/build_readme_lists.py writes them), so the
next sampler or scheduler needs no README edit by hand, and a stale README fails here."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import build_readme_lists  # noqa: E402


def test_readme_lists_every_registered_sampler_and_scheduler():
    text = build_readme_lists.README.read_text(encoding="utf-8")
    assert text == build_readme_lists.expected_readme(text), (
        "README.md's sampler/scheduler lists differ from the registries: run "
        "`PYTHONPATH=. python3 scripts/build_readme_lists.py`")


def test_the_lists_follow_the_registries(monkeypatch):
    from sdxl_core.sampling import samplers, schedules

    lists = build_readme_lists.sampler_lists()
    assert all(f"`{name}`" in lists for name in [*samplers.SAMPLERS, *schedules.SCHEDULERS])
    assert "Samplers (42," in lists and "Schedulers (9)" in lists
    # A sampler registered tomorrow shows up without touching the script.
    monkeypatch.setitem(samplers.SAMPLERS, "tomorrow", samplers.SAMPLERS["euler"])
    assert "`tomorrow`" in build_readme_lists.sampler_lists()


def test_a_readme_without_its_markers_is_refused():
    with pytest.raises(ValueError, match="marker pair"):
        build_readme_lists.expected_readme("# no markers here\n")
