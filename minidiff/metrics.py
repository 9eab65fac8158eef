"""Distances between two samples, to measure how close generated data is to the real thing.

Both are two-sample statistics on points x (n, d) and y (m, d) (images: flatten them first),
estimated without bias (U-statistics: pairs of a point with itself are left out), so for two
samples of the same distribution they scatter around 0 and may come out slightly negative.

- :func:`energy_distance`  D = 2 E|X - Y| - E|X - X'| - E|Y - Y'|    (Szekely & Rizzo), >= 0, = 0 iff same law
- :func:`mmd_rbf`          MMD^2 = E k(X, X') + E k(Y, Y') - 2 E k(X, Y),  k(a, b) = exp(-|a - b|^2 / (2 s^2))
- :func:`sliced_wasserstein`  the 1-D optimal-transport distance W_1, averaged over projections on unit directions

and, for pictures, :func:`edge_strength`: how much a reconstruction keeps the edges (blur lowers it).

The sums over all n * m pairs run in blocks of rows, so 10,000 x 10,000 points never hold more
than ~100 MB of distances at once (on top of one float64 copy of each sample).  NumPy only.
"""

from __future__ import annotations

import numpy as np

_BLOCK_ELEMENTS = 4_000_000  # distances held at once per block (32 MB in float64)


def _as_points(x, name) -> np.ndarray:
    x = np.array(x, dtype=np.float64)  # a copy: it is centred in place below
    if x.ndim == 1:
        x = x[:, None]  # 1-D data: n points of dimension 1
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name} must be (n, d) points with n >= 2 (flatten images first), got shape {x.shape}")
    return x


def _pair_mean(a, b, f, same: bool, block: int | None = None) -> float:
    """Mean of f(|a_i - b_j|^2) over all pairs (i, j); over i != j when a and b are the same sample."""
    a2, b2 = (a * a).sum(1), (b * b).sum(1)
    block = block or max(1, _BLOCK_ELEMENTS // len(b))
    total = 0.0
    for i0 in range(0, len(a), block):
        i1 = min(i0 + block, len(a))
        sq = np.maximum(a2[i0:i1, None] + b2[None, :] - 2.0 * a[i0:i1] @ b.T, 0.0)  # |a - b|^2
        v = f(sq)
        if same:
            idx = np.arange(i1 - i0)
            v[idx, i0 + idx] = 0.0  # leave out each point paired with itself
        total += v.sum()
    pairs = len(a) * (len(a) - 1) if same else len(a) * len(b)
    return total / pairs


def _two_samples(x, y):
    """Checked float64 points, both shifted by their pooled mean (distances unchanged, less rounding)."""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    mu = (x.sum(0) + y.sum(0)) / (len(x) + len(y))
    x -= mu
    y -= mu
    return x, y


def energy_distance(x, y, block: int | None = None) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between samples x (n, d) and y (m, d).

    Unbiased (U-statistic): the within-sample means leave out i = j.  This is the energy distance of
    Szekely & Rizzo itself, not its square root (which scipy's 1-D ``energy_distance`` returns).
    """
    x, y = _two_samples(x, y)
    dist = np.sqrt
    return (2 * _pair_mean(x, y, dist, False, block)
            - _pair_mean(x, x, dist, True, block) - _pair_mean(y, y, dist, True, block))


def median_bandwidth(x, y, max_points: int = 1000, seed: int = 0) -> float:
    """The median heuristic: the median distance between pooled points (on at most max_points of them)."""
    return _median_distance(*_two_samples(x, y), max_points, seed)


def _median_distance(x, y, max_points=1000, seed=0):
    pick = np.random.default_rng(seed).permutation(len(x) + len(y))[:max_points]
    z = np.concatenate([x[pick[pick < len(x)]], y[pick[pick >= len(x)] - len(x)]])
    z2 = (z * z).sum(1)
    sq = np.maximum(z2[:, None] + z2[None, :] - 2.0 * z @ z.T, 0.0)  # |z_i - z_j|^2
    return float(np.sqrt(np.median(sq[np.triu_indices(len(z), 1)])))


def mmd_rbf(x, y, bandwidth: float | None = None, block: int | None = None) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel exp(-|a - b|^2 / (2 bandwidth^2)).

    Unbiased (U-statistic), as :func:`energy_distance`.  ``bandwidth=None`` takes the median pairwise
    distance of the pooled samples (:func:`median_bandwidth`).
    """
    x, y = _two_samples(x, y)
    s = _median_distance(x, y) if bandwidth is None else float(bandwidth)
    if not s > 0:
        raise ValueError(f"bandwidth must be positive, got {s}")
    k = lambda sq: np.exp(-sq / (2 * s * s))  # noqa: E731
    return (_pair_mean(x, x, k, True, block) + _pair_mean(y, y, k, True, block)
            - 2 * _pair_mean(x, y, k, False, block))


def sliced_wasserstein(x, y, directions) -> float:
    """mean over unit directions u of W_1(x . u, y . u); x and y hold the same number of points, so each
    1-D W_1 is the mean |difference| of the sorted projections.  (Not a U-statistic: two samples of one
    law give a small positive value, which shrinks like 1/sqrt(n).)"""
    x, y = _as_points(x, "x"), _as_points(y, "y")
    if len(x) != len(y):
        raise ValueError(f"sliced_wasserstein compares samples of equal size, got {len(x)} and {len(y)} points")
    u = np.asarray(directions, np.float64)
    return float(np.mean(np.abs(np.sort(x @ u.T, axis=0) - np.sort(y @ u.T, axis=0))))


def edge_strength(images) -> float:
    """Mean squared difference of horizontally and vertically adjacent pixels of images (..., H, W, C):

        S = (mean (x[.., i, j+1, :] - x[.., i, j, :])^2 + mean (x[.., i+1, j, :] - x[.., i, j, :])^2) / 2

    A step of height h blurred over k pixels becomes k steps of h / k: its sum of squares falls from
    h^2 to h^2 / k.  So S(reconstructions) / S(pictures) < 1 measures blur; > 1 added texture or noise."""
    x = np.asarray(images, np.float64)
    if x.ndim < 3:
        raise ValueError(f"edge_strength takes images (..., H, W, C), got shape {x.shape}")
    return float((np.square(np.diff(x, axis=-2)).mean() + np.square(np.diff(x, axis=-3)).mean()) / 2)
