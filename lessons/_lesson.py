"""Shared plumbing for the lessons: quick mode, where figures go, saving them.

Quick mode (``--quick`` or ``MINIDIFF_QUICK=1``) shrinks data and steps so the test suite can
run every lesson end to end in seconds, and compiles without XLA's backend optimisations (a few
steps of everything: compile time dominates).  Figures go to ``--out DIR`` (or ``MINIDIFF_OUT``),
by default ``lessons/figures/``.
"""

import argparse
import os
from pathlib import Path

import matplotlib

if "ipykernel" not in os.environ.get("MPLBACKEND", "") and not hasattr(__builtins__, "__IPYTHON__"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_p = argparse.ArgumentParser(add_help=False)
_p.add_argument("--quick", action="store_true")
_p.add_argument("--out", default=os.environ.get("MINIDIFF_OUT", str(Path(__file__).parent / "figures")))
_args, _ = _p.parse_known_args()

QUICK = _args.quick or os.environ.get("MINIDIFF_QUICK", "") not in ("", "0")
if QUICK:  # a few steps of everything: compiling fast matters more than running fast (XLA reads this at start-up)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
OUT = Path(_args.out)
ROOT = Path(__file__).resolve().parent.parent  # the repository (runs/ and lessons/checkpoints/ live here)
OUT.mkdir(parents=True, exist_ok=True)


def trained_run(name: str, files=None):
    """Your run in runs/NAME if there is one, else the small copy shipped in lessons/checkpoints/NAME
    (``python lessons/checkpoints/build.py`` remakes those); None if neither exists.  A run is a folder
    holding all of ``files`` (default: a training checkpoint; a lesson's own results: their file names)."""
    if files is None:
        from minidiff.train.checkpoint import CHECKPOINT  # (imports JAX: after XLA_FLAGS is set above)

        files = [CHECKPOINT]
    for run in (ROOT / "runs" / name, ROOT / "lessons" / "checkpoints" / name):
        if all((run / f).is_file() for f in files):
            print(f"{name}: {run.relative_to(ROOT)}")
            return run
    return None


def savefig(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path}")
    return path
