import os
import tempfile

import numpy as np
import pytest

# The command line keeps compiled programs in a user folder (minidiff.compile_cache); the suite's runs
# share one of their own, away from the home folder, unless one is given.
os.environ.setdefault("MINIDIFF_CACHE_DIR", tempfile.mkdtemp(prefix="minidiff-test-cache-"))
# Every program the suite compiles goes to that folder too, in this process and in the lessons and
# commands it starts (they inherit the environment): identical programs are compiled once per run
# instead of once per use (each pipeline object jits its own functions, and every lesson loads the
# same built-in model).  Measured on lesson 10 in quick mode: 255 s without, 170 s with.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MINIDIFF_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
