"""Every lesson runs end to end in quick mode and writes its figures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

LESSONS = sorted((Path(__file__).parent.parent / "lessons").glob("[0-9][0-9]_*.py"))


def test_there_are_lessons():
    assert len(LESSONS) >= 2


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_in_quick_mode(lesson, tmp_path):
    env = {**os.environ, "MINIDIFF_QUICK": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(lesson), "--out", str(tmp_path)], cwd=lesson.parent, env=env,
                       capture_output=True, text=True, timeout=1800)  # each takes < 2 min idle; the limit only catches a hang
    assert r.returncode == 0, r.stderr[-3000:]
    figures = sorted(tmp_path.glob(f"{lesson.stem[:2]}_*.png"))
    assert figures, f"{lesson.name} saved no figures"
    for f in figures:
        with Image.open(f) as im:
            assert im.size[0] > 100 and im.size[1] > 100


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_opens_with_a_jupytext_header(lesson):
    """jupytext reads a percent-format script's metadata only from a header fenced by '# ---' lines."""
    lines = lesson.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# ---" and lines[1] == "# jupyter:", lesson.name
    assert "# ---" in lines[2:8] and "#     formats: py:percent" in lines[:8], lesson.name
