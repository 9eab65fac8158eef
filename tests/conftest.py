import os
import tempfile

import numpy as np
import pytest

# The command line keeps compiled programs in a user folder (minidiff.compile_cache); the suite's runs
# share one of their own, away from the home folder, unless one is given.
os.environ.setdefault("MINIDIFF_CACHE_DIR", tempfile.mkdtemp(prefix="minidiff-test-cache-"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
