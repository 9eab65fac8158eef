import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def z_bound(n_sigma: float, se: float) -> float:
    """A tolerance of n_sigma standard errors."""
    return n_sigma * se
