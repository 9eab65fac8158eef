"""Two helpers shared by the forward process and the samplers.  They use only ``.shape``,
``.ndim`` and ``.reshape``, so they work on NumPy arrays and on (traced) JAX arrays alike."""

from __future__ import annotations

import numpy as np


def check_shapes(**arrays) -> None:
    """Raise ``ValueError`` naming the arrays if they do not all have the same shape."""
    shapes = {name: tuple(np.shape(a)) for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed} must all have the same shape")


def expand_like(c, x):
    """Make a coefficient broadcast against ``x``: a scalar stays a scalar; a per-example vector
    of length ``x.shape[0]`` becomes shape (B, 1, ..., 1).

    NumPy coefficients are taken as Python floats / cast to x's dtype, so a float32 array stays
    float32 (a float64 table entry would otherwise promote the whole array to float64)."""
    ndim = np.ndim(c)
    if ndim == 0:
        return float(c) if isinstance(c, (np.generic, np.ndarray)) else c
    if isinstance(c, np.ndarray) and isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
        c = c.astype(x.dtype)
    if ndim != 1 or np.shape(c)[0] != np.shape(x)[0]:
        raise ValueError(
            f"a coefficient must be a scalar or have one entry per example (shape ({np.shape(x)[0]},)); "
            f"got shape {np.shape(c)} for an array of shape {np.shape(x)}"
        )
    return c.reshape((-1,) + (1,) * (np.ndim(x) - 1))
