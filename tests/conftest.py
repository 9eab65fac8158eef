import os
import tempfile

import numpy as np
import pytest

from minidiff import compile_cache

# The command line keeps compiled programs in a user folder (minidiff.compile_cache); the suite's runs
# share one of their own, away from the home folder, unless one is given.
os.environ.setdefault("MINIDIFF_CACHE_DIR", tempfile.mkdtemp(prefix="minidiff-test-cache-"))
# Every program the suite compiles goes to that folder too, in this process and in the lessons and
# commands it starts (before JAX is imported, enable() sets JAX's environment variables, which they
# inherit), with the same settings as the command line's: identical programs are compiled once per run
# instead of once per use (each pipeline object jits its own functions, and every lesson loads the
# same built-in model).  Measured on lesson 10 in quick mode: 255 s without, 170 s with.
compile_cache.enable()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_runtest_logreport(report):
    """With MINIDIFF_TEST_TIMES=FILE, each test phase's seconds are appended to FILE as it ends (pytest's
    --durations prints them only when the whole run is over)."""
    path = os.environ.get("MINIDIFF_TEST_TIMES")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under pytest-xdist the controller gets every report too
        return
    if path and report.duration > 0.5:
        with open(path, "a") as f:
            f.write(f"{report.duration:8.1f} {report.when:8s} {report.nodeid}\n")
