"""Write README.md's sampler and scheduler lists from the registries (sdxl_core/sampling/samplers `SAMPLERS`,
sdxl_core/sampling/schedules.py `SCHEDULERS`), so a new sampler or scheduler is one file and the README follows.

The lists sit between `<!-- samplers:begin -->` / `<!-- samplers:end -->` markers; tests/test_readme_lists.py fails
when the README disagrees with the registries. Run from the repository root:
`PYTHONPATH=. python3 scripts/build_readme_lists.py`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- samplers:begin -->", "<!-- samplers:end -->"


def sampler_lists() -> str:
    """The Markdown between the markers: every sampler (noting the stochastic ones) and every scheduler."""
    from sdxl_core.sampling.samplers import SAMPLERS
    from sdxl_core.sampling.schedules import SCHEDULERS

    def names(items) -> str:
        return ", ".join(f"`{name}`" for name in items)

    stochastic = [name for name, spec in SAMPLERS.items() if spec.stochastic]
    return (f"- Samplers ({len(SAMPLERS)}, ComfyUI's KSampler names in its order): {names(SAMPLERS)}.\n"
            f"  Of these, {names(stochastic)} add noise on the way, drawn from the seed as ComfyUI draws it.\n"
            f"- Schedulers ({len(SCHEDULERS)}): {names(SCHEDULERS)}.")


def expected_readme(text: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"README.md must hold the marker pair {BEGIN} ... {END} exactly once")
    return pattern.sub(lambda _: f"{BEGIN}\n{sampler_lists()}\n{END}", text)


def main() -> int:
    text = README.read_text(encoding="utf-8")
    updated = expected_readme(text)
    if updated != text:
        README.write_text(updated, encoding="utf-8")
        print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
