"""Energy distance and MMD: against closed forms for Gaussians, and as detectors of a difference."""

import math
import tracemalloc

import numpy as np
import pytest

from minidiff.metrics import energy_distance, median_bandwidth, mmd_rbf, sliced_wasserstein


def mean_abs_normal(mu, s):
    """E|Z| for Z ~ N(mu, s^2) (the folded normal's mean)."""
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    return s * math.sqrt(2 / math.pi) * math.exp(-mu**2 / (2 * s**2)) + mu * (1 - 2 * Phi(-mu / s))


def replicate(stat, R=24, n=600, m=500, seed=0, shift=1.0, scale=2.0):
    """R independent estimates of stat(x, y), x ~ N(0, 1), y ~ N(shift, scale^2), 1-D."""
    rng = np.random.default_rng(seed)
    return np.array([stat(rng.standard_normal(n), shift + scale * rng.standard_normal(m)) for _ in range(R)])


def test_energy_distance_of_two_gaussians_matches_the_closed_form():
    # X ~ N(0, 1), Y ~ N(1, 4):  X - Y ~ N(-1, 5),  X - X' ~ N(0, 2),  Y - Y' ~ N(0, 8)
    exact = 2 * mean_abs_normal(-1, math.sqrt(5)) - mean_abs_normal(0, math.sqrt(2)) - mean_abs_normal(0, math.sqrt(8))
    est = replicate(energy_distance)
    se = est.std(ddof=1) / math.sqrt(len(est))  # standard error of the mean of R unbiased estimates
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
    assert se < 0.1 * exact  # the check has teeth: the tolerance is small next to the value


def test_mmd_of_two_gaussians_matches_the_closed_form():
    # For a Gaussian kernel of width b: E k(X, Y) = b / sqrt(b^2 + v) exp(-(m1 - m2)^2 / (2 (b^2 + v))),
    # v = var(X) + var(Y).
    b = 1.5
    Ek = lambda dm, v: b / math.sqrt(b * b + v) * math.exp(-dm**2 / (2 * (b * b + v)))  # noqa: E731
    exact = Ek(0, 2) + Ek(0, 8) - 2 * Ek(1, 5)
    est = replicate(lambda x, y: mmd_rbf(x, y, bandwidth=b))
    se = est.std(ddof=1) / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)
    assert se < 0.1 * exact


@pytest.mark.parametrize("metric", [energy_distance, mmd_rbf])
def test_same_distribution_scores_near_zero_and_a_shift_scores_high(metric):
    rng = np.random.default_rng(1)
    x, y, z = (rng.standard_normal((2000, 2)) for _ in range(3))
    same, shifted = metric(x, y), metric(x, z + [0.5, 0.0])
    assert shifted > 0.02
    assert abs(same) < 0.1 * shifted, (same, shifted)


@pytest.mark.parametrize("metric", [energy_distance, lambda x, y, block=None: mmd_rbf(x, y, 0.7, block)])
def test_blocked_sums_equal_the_direct_formula(metric):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((37, 5)), rng.standard_normal((23, 5)) + 0.3
    direct = _direct(metric is energy_distance, x, y)
    for block in (1, 7, None):
        np.testing.assert_allclose(metric(x, y, block=block), direct, rtol=1e-10)


def _direct(energy, x, y):
    """The U-statistics written out with all pairwise distances in memory."""
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    f = (lambda r: r) if energy else (lambda r: np.exp(-r**2 / (2 * 0.7**2)))
    within = lambda a: (f(d(a, a)).sum() - len(a) * f(np.zeros(1))[0]) / (len(a) * (len(a) - 1))  # noqa: E731
    between = f(d(x, y)).mean()
    return 2 * between - within(x) - within(y) if energy else within(x) + within(y) - 2 * between


def test_distances_ignore_a_common_translation():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((300, 3)), rng.standard_normal((300, 3)) * 1.3
    far = np.array([1e4, -3e4, 5e3])
    np.testing.assert_allclose(energy_distance(x + far, y + far), energy_distance(x, y), rtol=1e-6)
    np.testing.assert_allclose(mmd_rbf(x + far, y + far), mmd_rbf(x, y), rtol=1e-6)


def test_median_bandwidth_of_a_gaussian():
    # |X - X'| for X ~ N(0, I_2) is sqrt(2) times a Rayleigh(1), whose median is sqrt(2 ln 2)
    rng = np.random.default_rng(4)
    s = median_bandwidth(rng.standard_normal((1000, 2)), rng.standard_normal((1000, 2)))
    assert abs(s - math.sqrt(2) * math.sqrt(2 * math.log(2))) < 0.05


def test_ten_thousand_points_each_stay_within_memory():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((10_000, 2)), rng.standard_normal((10_000, 2))
    tracemalloc.start()
    energy_distance(x, y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 10e6 < peak < 400e6, f"peak {peak / 1e6:.0f} MB"  # (more than 10 MB: the tracing saw NumPy)


def test_bad_input():
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="n >= 2"):
        mmd_rbf(np.zeros((1, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_rbf(np.ones((5, 2)), np.ones((5, 2)), bandwidth=0.0)


def test_sliced_wasserstein_of_a_shift_is_the_mean_projected_shift():
    """W_1 between a sample and its translate by c, along unit u, is |u . c| exactly."""
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((500, 2)), np.array([0.3, -1.2])
    u = rng.standard_normal((16, 2))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    assert sliced_wasserstein(x, x, u) == 0.0
    assert math.isclose(sliced_wasserstein(x, x + c, u), np.mean(np.abs(u @ c)), rel_tol=1e-12)
    with pytest.raises(ValueError, match="equal size"):
        sliced_wasserstein(x, x[:10], u)


def test_edge_strength_of_a_step_falls_by_the_blur_width():
    """A vertical step 0 -> 1 has one jump per row; a 3-pixel box blur makes it three jumps of 1/3:
    the mean squared difference falls to exactly a third."""
    from minidiff.metrics import edge_strength

    step = np.zeros((2, 8, 16, 3))
    step[:, :, 8:] = 1.0
    blurred = np.zeros_like(step)
    blurred[:, :, 7], blurred[:, :, 8], blurred[:, :, 9:] = 1 / 3, 2 / 3, 1.0
    assert edge_strength(step) == pytest.approx((1 / 15) / 2)  # 1 of 15 horizontal differences per row, no vertical
    assert edge_strength(blurred) / edge_strength(step) == pytest.approx(1 / 3)
    assert edge_strength(np.ones((4, 4, 3))) == 0.0
    with pytest.raises(ValueError, match="H, W, C"):
        edge_strength(np.ones(5))
