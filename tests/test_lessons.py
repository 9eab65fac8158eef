"""Every lesson runs end to end in quick mode, as a notebook, and writes its figures."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

LESSONS = sorted((Path(__file__).parent.parent / "lessons").glob("[0-9][0-9]_*.py"))
SOLUTIONS = sorted((Path(__file__).parent.parent / "lessons" / "solutions").glob("[0-9][0-9]_*.py"))


def test_there_are_lessons():
    assert len(LESSONS) >= 2


def run_as_notebook(path: Path, out: Path, monkeypatch) -> None:
    """Convert a lesson to a notebook with jupytext and run every cell in a Jupyter kernel started in
    lessons/ (as a student opening it would), in quick mode, its figures going to ``out``."""
    import jupytext
    import nbclient
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("MINIDIFF_QUICK", "1")
    monkeypatch.setenv("MINIDIFF_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(path)
    # a limit per cell that only catches a hang: each lesson takes under 2 minutes in all
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS[0].parent)}})
    try:
        client.execute()
    except CellExecutionError as e:  # the cell's source and the traceback, without the kernel's colours
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
        pytest.fail(f"{path.name} failed as a notebook:\n{plain[-4000:]}")


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_runs_as_a_notebook_in_quick_mode(lesson, tmp_path, monkeypatch):
    run_as_notebook(lesson, tmp_path, monkeypatch)
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


def exercises(lesson: Path) -> list[str]:
    """The numbers of the exercises a lesson's "## Exercises" cell lists ("# 1. **...")."""
    text = lesson.read_text(encoding="utf-8")
    if "# ## Exercises" not in text:
        return []
    cell = text.split("# ## Exercises", 1)[1].split("# %%", 1)[0]
    return re.findall(r"^# (\d+)\. \*\*", cell, flags=re.M)


@pytest.mark.parametrize("lesson", [p for p in LESSONS if exercises(p)], ids=lambda p: p.stem)
def test_each_exercise_has_a_solution(lesson):
    solution = lesson.parent / "solutions" / lesson.name
    assert solution.exists(), f"{lesson.name} has exercises but no lessons/solutions/{lesson.name}"
    answered = re.findall(r"^# ## (\d+)\. ", solution.read_text(encoding="utf-8"), flags=re.M)
    assert answered == exercises(lesson), (lesson.name, answered)
    assert 2 <= len(answered) <= 4


@pytest.mark.parametrize("solution", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_runs_and_its_checks_hold(solution, tmp_path):
    """A solution computes each answer and asserts it: a wrong claim fails here."""
    env = {**os.environ, "MINIDIFF_QUICK": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(solution), "--out", str(tmp_path)], cwd=solution.parent.parent, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
