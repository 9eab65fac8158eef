"""The suite runs on two pytest-xdist workers (``-n 2`` in pyproject.toml), a whole file per worker.
Tests marked ``bigmem`` (Stable Diffusion-sized models, 10-17 GB) run alone: they hold an exclusive
lock that every other test takes shared, so the two workers never add two large peaks together."""

import fcntl
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # one id for all the workers of a run (None: no xdist)

# The command line keeps compiled programs in a user folder (minidiff.compile_cache); the suite's runs
# share one of their own, away from the home folder, unless one is given.
if RUN:
    _shared = Path(tempfile.gettempdir()) / f"minidiff-test-cache-{RUN}"
    _shared.mkdir(exist_ok=True)
    os.environ.setdefault("MINIDIFF_CACHE_DIR", str(_shared))
else:
    os.environ.setdefault("MINIDIFF_CACHE_DIR", tempfile.mkdtemp(prefix="minidiff-test-cache-"))
# Every program the suite compiles goes to that folder too, in this process and in the lessons and
# commands it starts (they inherit the environment): identical programs are compiled once per run
# instead of once per use (each pipeline object jits its own functions, and every lesson loads the
# same built-in model).  Measured on lesson 10 in quick mode: 255 s without, 170 s with.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MINIDIFF_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.fixture(autouse=True)
def _one_big_memory_test_at_a_time(request):
    """Shared lock for every test, exclusive for ``@pytest.mark.bigmem`` (only under xdist)."""
    if not RUN:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"minidiff-bigmem-{RUN}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if request.node.get_closest_marker("bigmem") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
