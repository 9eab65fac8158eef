"""The README's figures exist and each is drawn by a lesson or a benchmark (no orphan, no stale name)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SHOWN = sorted(set(re.findall(r"!\[[^\]]*\]\((docs/figures/[^)\s]+)\)", README)))
DRAWERS = sorted([*(ROOT / "lessons").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


def test_the_readme_shows_figures():
    assert len(SHOWN) >= 10


@pytest.mark.parametrize("figure", SHOWN)
def test_each_readme_figure_exists_and_a_lesson_or_benchmark_draws_it(figure):
    path = ROOT / figure
    assert path.is_file(), f"README shows {figure}, which does not exist"
    stem = Path(figure).stem  # a lesson may save x.png and the README show a smaller x.jpg
    drawers = [p.relative_to(ROOT).as_posix() for p in DRAWERS if re.search(rf"\b{re.escape(stem)}\b", p.read_text(encoding="utf-8"))]
    assert drawers, f"no lesson or benchmark writes {stem}.* (README: {figure})"
    if stem[:2].isdigit():  # NN_name: the figure of lesson NN
        assert any(d.startswith(f"lessons/{stem[:2]}_") or d.startswith("benchmarks/") for d in drawers), (figure, drawers)
