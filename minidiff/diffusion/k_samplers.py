"""ODE/SDE samplers in the sigma view (Karras et al. 2022, k-diffusion): Euler, Euler ancestral,
Heun and LMS -- diffusers' EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, LMSDiscrete.

In the sigma space x = x_t / sqrt(ab) = x0 + sigma eps the probability-flow ODE reads

    dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma = eps_hat        (D = x0_hat, the denoiser)

and a sampler integrates it along a grid sigma_0 > sigma_1 > ... > sigma_N = 0 (``sigmas.SigmaGrid``).
Each sampler NAME is three functions, shaped for one ``jax.lax.scan``:

    NAME_tables(grid, **options) -> {"t": (N,), "sigma": (N,), ...}     per-step scalars, NumPy, host
    NAME_init(x) -> state                                               a tuple of arrays
    NAME_step(predict, x, state, k, noise, *, prediction_type) -> (x_next, state)

x is in the VP space (x_t, what the model sees) before and after a step; ``predict(x_t, t)`` is the
model; k is one row of the tables.  Steps are plain arithmetic, so they run on NumPy arrays and on
traced JAX arrays; every rule that depends on the grid alone (the last step, LMS's coefficients)
lives in the tables.
"""

from __future__ import annotations

import numpy as np

from ._arrays import expand_like
from .samplers import split_prediction
from .schedule import NoiseSchedule
from .sigmas import SigmaGrid, alpha_bar_from_sigma, from_sigma_space, sigma_grid, to_sigma_space


def euler_grid(schedule: NoiseSchedule, num_steps: int, sigmas: str = "default", spacing: str = "leading",
               steps_offset: int = 0, final: str = "zero") -> SigmaGrid:
    """The grid of diffusers' Euler-family schedulers (Euler, Euler ancestral, Heun, LMS): as
    ``sigma_grid``, except that "linspace" keeps the timesteps unrounded, t = linspace(0, T-1, N)."""
    T = len(schedule)
    timesteps = np.linspace(0, T - 1, num_steps)[::-1] if spacing == "linspace" else None
    return sigma_grid(schedule, num_steps, kind=sigmas, spacing=spacing, steps_offset=steps_offset, final=final,
                      timesteps=timesteps)


euler_ancestral_grid = heun_grid = lms_grid = euler_grid


def _base_tables(grid: SigmaGrid) -> dict:
    return {"t": np.asarray(grid.timesteps, np.float64), "sigma": grid.sigmas[:-1], "sigma_next": grid.sigmas[1:]}


def _slope(predict, x, t, sigma, prediction_type):
    """d(x, sigma) = (x - D(x; sigma)) / sigma = eps_hat, from the model's output at (x_t, t)."""
    return split_prediction(predict(x, t), x, alpha_bar_from_sigma(sigma), prediction_type)[1]


# ---------------------------------------------------------------------------------------------
# Euler (Karras et al. Algorithm 1 without churn; diffusers' EulerDiscreteScheduler)
# ---------------------------------------------------------------------------------------------


def euler_tables(grid: SigmaGrid) -> dict:
    return _base_tables(grid)


def euler_init(x):
    return ()


def euler_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i)        (sigma space)"""
    d = _slope(predict, x, k["t"], k["sigma"], prediction_type)
    x_next = to_sigma_space(x, k["sigma"]) + expand_like(k["sigma_next"] - k["sigma"], x) * d
    return from_sigma_space(x_next, k["sigma_next"]), state


# ---------------------------------------------------------------------------------------------
# Euler ancestral (k-diffusion's sample_euler_ancestral; diffusers' EulerAncestralDiscreteScheduler)
# ---------------------------------------------------------------------------------------------


def euler_ancestral_tables(grid: SigmaGrid, eta: float = 1.0, s_noise: float = 1.0) -> dict:
    """Split the jump sigma_i -> sigma_{i+1} into a deterministic part down to sigma_down and fresh
    noise of scale sigma_up, sigma_down^2 + sigma_up^2 = sigma_{i+1}^2:

        sigma_up   = min(sigma_{i+1}, eta sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2))
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)

    eta = 1 is the ancestral (DDPM-like) sampler, eta = 0 plain Euler; the last step (sigma_N = 0)
    adds no noise.  ``s_noise`` scales the fresh noise."""
    tables = _base_tables(grid)
    s, s_next = tables["sigma"], tables["sigma_next"]
    sigma_up = np.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    tables.update(sigma_up=sigma_up, sigma_down=(s_next**2 - sigma_up**2) ** 0.5, s_noise=np.full(len(s), s_noise))
    return tables


def euler_ancestral_init(x):
    return ()


def euler_ancestral_step(predict, x, state, k, noise, *, prediction_type="epsilon"):
    """x_{i+1} = x_i + (sigma_down - sigma_i) d(x_i, sigma_i) + s_noise sigma_up z     (sigma space)"""
    if noise is None:
        raise ValueError("euler_ancestral_step draws fresh noise: pass z ~ N(0, I) like x as noise")
    d = _slope(predict, x, k["t"], k["sigma"], prediction_type)
    x_next = to_sigma_space(x, k["sigma"]) + expand_like(k["sigma_down"] - k["sigma"], x) * d
    x_next = x_next + expand_like(k["s_noise"] * k["sigma_up"], x) * noise
    return from_sigma_space(x_next, k["sigma_next"]), state


# ---------------------------------------------------------------------------------------------
# Heun (Karras et al. Algorithm 1 without churn; diffusers' HeunDiscreteScheduler)
# ---------------------------------------------------------------------------------------------


def heun_tables(grid: SigmaGrid) -> dict:
    """Two model calls per step: at (x_i, sigma_i) and at the Euler guess (x', sigma_2 = sigma_{i+1}),
    mixed with weights w_1 = w_2 = 1/2.  The last step (to sigma_N = 0, where d is undefined) is
    first order: w = (1, 0), and its second call -- kept so that every step is the same graph --
    is a throwaway evaluation at sigma_2 = sigma_{N-1}."""
    tables = _base_tables(grid)
    n = len(grid)
    last = np.arange(n) == n - 1
    tables["t_2"] = np.where(last, tables["t"], np.append(tables["t"][1:], 0.0))
    tables["sigma_2"] = np.where(last, tables["sigma"], tables["sigma_next"])
    tables["w_1"] = np.where(last, 1.0, 0.5)
    tables["w_2"] = 1 - tables["w_1"]
    return tables


def heun_init(x):
    return ()


def heun_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """x'      = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i)                         Euler guess
    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (w_1 d(x_i, sigma_i) + w_2 d(x', sigma_{i+1}))   (sigma space)"""
    dt = expand_like(k["sigma_next"] - k["sigma"], x)
    d_1 = _slope(predict, x, k["t"], k["sigma"], prediction_type)
    x_s = to_sigma_space(x, k["sigma"])
    x_2 = from_sigma_space(x_s + dt * d_1, k["sigma_2"])
    d_2 = _slope(predict, x_2, k["t_2"], k["sigma_2"], prediction_type)
    x_next = x_s + dt * (expand_like(k["w_1"], x) * d_1 + expand_like(k["w_2"], x) * d_2)
    return from_sigma_space(x_next, k["sigma_next"]), state


# ---------------------------------------------------------------------------------------------
# LMS: linear multistep (k-diffusion's sample_lms; diffusers' LMSDiscreteScheduler)
# ---------------------------------------------------------------------------------------------

LMS_MAX_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_MAX_ORDER) -> np.ndarray:
    """c[i, j] = integral from sigma_i to sigma_{i+1} of l_j(tau) dtau, where l_j is the Lagrange basis
    polynomial through sigma_i, ..., sigma_{i-r+1} that is 1 at sigma_{i-j} (r = min(i + 1, order)),
    so that sum_j c[i, j] d_{i-j} integrates the polynomial through the last r slopes.  Gauss-Legendre
    quadrature with ``order`` nodes is exact for these degree r-1 polynomials.  Shape (N, order)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    c = np.zeros((len(sigmas) - 1, order))
    for i in range(len(sigmas) - 1):
        r = min(i + 1, order)
        a, b = sigmas[i], sigmas[i + 1]
        tau = a + (b - a) * (nodes + 1) / 2
        for j in range(r):
            basis = np.ones_like(tau)
            for m in range(r):
                if m != j:
                    basis *= (tau - sigmas[i - m]) / (sigmas[i - j] - sigmas[i - m])
            c[i, j] = (b - a) / 2 * weights @ basis
    return c


def lms_tables(grid: SigmaGrid, order: int = LMS_MAX_ORDER) -> dict:
    """The coefficients c_0..c_3 of ``lms_coefficients`` per step (zero beyond the order reached:
    the first steps warm up with orders 1, 2, 3)."""
    if not 1 <= order <= LMS_MAX_ORDER:
        raise ValueError(f"LMS order must be in 1..{LMS_MAX_ORDER}, got {order}")
    c = np.zeros((len(grid), LMS_MAX_ORDER))
    c[:, :order] = lms_coefficients(grid.sigmas, order)
    return {**_base_tables(grid), **{f"c_{j}": c[:, j] for j in range(LMS_MAX_ORDER)}}


def lms_init(x):
    """The slopes d_{i-1}, d_{i-2}, d_{i-3} of the previous steps (zeros before there are any)."""
    return tuple(x * 0 for _ in range(LMS_MAX_ORDER - 1))


def lms_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """x_{i+1} = x_i + c_0 d_i + c_1 d_{i-1} + c_2 d_{i-2} + c_3 d_{i-3}        (sigma space)"""
    d = _slope(predict, x, k["t"], k["sigma"], prediction_type)
    slopes = (d,) + tuple(state)
    x_next = to_sigma_space(x, k["sigma"])
    for j, d_j in enumerate(slopes):
        x_next = x_next + expand_like(k[f"c_{j}"], x) * d_j
    return from_sigma_space(x_next, k["sigma_next"]), slopes[:-1]

