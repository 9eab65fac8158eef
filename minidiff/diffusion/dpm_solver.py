"""Multistep exponential-integrator solvers: DPM-Solver++(2M), its SDE variant, and UniPC.

x stays in the VP space, x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(ab), sigma_t = sqrt(1 - ab)
(so alpha_t = 1 / sqrt(1 + s^2), sigma_t = s alpha_t for a grid sigma s = sqrt((1 - ab) / ab)), and
the solvers step in the half log-SNR

    lambda_t = log(alpha_t / sigma_t) = -log s,     h = lambda_t - lambda_s,    e^{-h} = s_t / s_s.

Over one step s -> t the data-prediction ODE integrates exactly to (Lu et al. 2022, DPM-Solver++ eq. 9)

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D                                  (*)

with D the x0_hat estimate for the step: D = x0_hat(x_s) is first order (DDIM); the solvers below
build second-order D from the previous steps' x0_hat.  Everything that depends only on the grid is
precomputed on the host into per-step tables (``NAME_tables``); the steps (``NAME_step``) are plain
arithmetic, the same code on NumPy arrays and on traced JAX arrays inside ``jax.lax.scan``:

    tables = NAME_tables(grid);  state = NAME_init(x)
    for i in range(N):  x, state = NAME_step(predict, x, state, {n: v[i] for n, v in tables.items()}, noise[i])

A lower-order step is the same combination with the higher-order coefficient 0.  ``multistep_grid``
builds the grid diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler walk.
"""

from __future__ import annotations

import numpy as np

from ._arrays import expand_like
from .samplers import inference_timesteps, split_prediction
from .schedule import NoiseSchedule
from .sigmas import SigmaGrid, sigma_grid

# ---------------------------------------------------------------------------------------------
# The grid and the per-step quantities
# ---------------------------------------------------------------------------------------------


def multistep_grid(schedule: NoiseSchedule, num_steps: int, sigmas: str = "default", spacing: str = "linspace",
                   steps_offset: int = 0, final: str = "zero") -> SigmaGrid:
    """diffusers' multistep-solver grid: timesteps are the N + 1 spaced ones less the last (t = 0) for
    "linspace" and "leading" spacing, the usual N for "trailing"; Karras / exponential sigmas span all
    the training sigmas, Karras timesteps rounded to integers."""
    T = len(schedule.alpha_bar)
    if spacing == "trailing":
        t = inference_timesteps(num_steps, T, spacing, steps_offset)
    else:
        t = inference_timesteps(num_steps + 1, T, spacing, steps_offset)[:-1]
    return sigma_grid(schedule, num_steps, sigmas, timesteps=t, final=final,
                      round_timesteps=sigmas == "karras", sigma_range="train")


dpmpp_2m_grid = dpmpp_2m_sde_grid = unipc_grid = multistep_grid


def _step_quantities(grid: SigmaGrid):
    """Per step i (s = sigmas[i] -> t = sigmas[i + 1]): the tables of (*), and h_i (inf into s = 0)."""
    s = np.asarray(grid.sigmas, np.float64)
    alpha = (1 + s**2) ** -0.5  # alpha_t = sqrt(ab)
    sigma = s * alpha  # sigma_t = sqrt(1 - ab)
    with np.errstate(divide="ignore"):
        h = np.log(s[:-1] / s[1:])  # lambda_t - lambda_s
    table = {
        "t": np.asarray(grid.timesteps, np.float64),
        "ab": alpha[:-1] ** 2,  # alpha_bar at s, for x0_hat
        "sigma_ratio": sigma[1:] / sigma[:-1],  # sigma_t / sigma_s
        "alpha": alpha[1:],  # alpha_t
        "exp_neg_h": s[1:] / s[:-1],  # e^{-h}
    }
    return table, h


def _x0_hat(predict, x, k, prediction_type):
    x0, _ = split_prediction(predict(x, k["t"]), x, k["ab"], prediction_type)
    return x0


def _row(k, x):
    """Table entries as coefficients for x (NumPy scalars become Python floats: float32 stays float32)."""
    return {n: expand_like(v, x) for n, v in k.items()}


def _exp_update(x, D, sigma_ratio, alpha, exp_neg_h):
    """(*): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D."""
    return sigma_ratio * x - alpha * (exp_neg_h - 1) * D


def _second_order(grid: SigmaGrid, lower_order_final: bool, only_if_short: bool) -> np.ndarray:
    """Which steps may use the previous x0_hat: not the first, not the one into sigma = 0 (h = inf),
    nor the last with ``lower_order_final`` (DPM-Solver, ``only_if_short``: only when N < 15)."""
    n = len(grid)
    second = np.arange(n) > 0
    second &= np.asarray(grid.sigmas[1:]) > 0
    if lower_order_final and (n < 15 or not only_if_short):
        second[-1] = False
    return second


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M) and SDE-DPM-Solver++(2M)
# ---------------------------------------------------------------------------------------------


def dpmpp_2m_tables(grid: SigmaGrid, lower_order_final: bool = True) -> dict[str, np.ndarray]:
    """The tables of (*) and ``half_over_r`` = 1 / (2 r_i), r_i = h_{i-1} / h_i (0 on first-order
    steps: the first, the one into sigma = 0, and with ``lower_order_final`` the last when N < 15)."""
    table, h = _step_quantities(grid)
    second = _second_order(grid, lower_order_final, only_if_short=True)
    half_over_r = np.zeros(len(grid))
    i = np.flatnonzero(second)
    half_over_r[i] = 0.5 * h[i] / h[i - 1]
    return {**table, "half_over_r": half_over_r}


def dpmpp_2m_init(x):
    """State: the previous step's x0_hat (zeros before the first step, where it has weight 0)."""
    return (x * 0,)


def _dpmpp_D(x0, x0_prev, c):
    """Multistep midpoint estimate D_i = x0_hat_i + (x0_hat_i - x0_hat_{i-1}) / (2 r_i)."""
    return x0 + c["half_over_r"] * (x0 - x0_prev)


def dpmpp_2m_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D_i."""
    c = _row(k, x)
    x0 = _x0_hat(predict, x, k, prediction_type)
    D = _dpmpp_D(x0, state[0], c)
    return _exp_update(x, D, c["sigma_ratio"], c["alpha"], c["exp_neg_h"]), (x0,)


def dpmpp_2m_sde_tables(grid: SigmaGrid, lower_order_final: bool = True) -> dict[str, np.ndarray]:
    """dpmpp_2m's tables and ``noise_scale`` = sigma_t sqrt(1 - e^{-2h})."""
    table = dpmpp_2m_tables(grid, lower_order_final)
    s_t = np.asarray(grid.sigmas[1:], np.float64)
    sigma_t = s_t * (1 + s_t**2) ** -0.5
    return {**table, "noise_scale": sigma_t * (1 - table["exp_neg_h"] ** 2) ** 0.5}


dpmpp_2m_sde_init = dpmpp_2m_init


def dpmpp_2m_sde_step(predict, x, state, k, noise, *, prediction_type="epsilon"):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; diffusers' "sde-dpmsolver++", midpoint):

        x_t = (sigma_t / sigma_s) e^{-h} x + alpha_t (1 - e^{-2h}) D_i + sigma_t sqrt(1 - e^{-2h}) z
    """
    c = _row(k, x)
    x0 = _x0_hat(predict, x, k, prediction_type)
    D = _dpmpp_D(x0, state[0], c)
    e = c["exp_neg_h"]
    x_t = c["sigma_ratio"] * e * x + c["alpha"] * (1 - e * e) * D + c["noise_scale"] * noise
    return x_t, (x0,)


# ---------------------------------------------------------------------------------------------
# UniPC (B(h) = e^{-h} - 1, "bh2"; order 2; predictor UniP + corrector UniC)
# ---------------------------------------------------------------------------------------------


def unipc_tables(grid: SigmaGrid, lower_order_final: bool = True) -> dict[str, np.ndarray]:
    """Predictor UniP-2 with rho = 1/2 is DPM-Solver++(2M): dpmpp_2m's tables (lower order on the
    first step, and with ``lower_order_final`` on the last for any N).  Corrector row i re-does
    step i-1 -> i with UniC-p, p the order of that predictor step (Zhao et al. 2023, with bh2):

        D^c = m_s + rho_1 D_1 + rho_t (m_t - m_s),   D_1 = (m_{s-1} - m_s) / r,   r = (lambda_{s-1} - lambda_s) / h
        p = 1: rho_t = 1/2, rho_1 = 0
        p = 2: [[1, 1], [r, 1]] (rho_1, rho_t) = b,   b_k = k! hh phi_{k+1}(hh) / B(hh),  hh = -h

    stored as ``c_rho1_over_r``, ``c_rho_t`` and the step's (*) coefficients (``c_*``); ``keep`` = 1
    on row 0 (nothing to correct; the c_* coefficients are 0 there)."""
    table, h = _step_quantities(grid)
    second = _second_order(grid, lower_order_final, only_if_short=False)
    n = len(grid)
    half_over_r = np.zeros(n)
    i = np.flatnonzero(second)
    half_over_r[i] = 0.5 * h[i] / h[i - 1]
    corr = {name: np.zeros(n) for name in ("c_sigma_ratio", "c_alpha", "c_exp_neg_h", "c_rho1_over_r", "c_rho_t")}
    for name in ("sigma_ratio", "alpha", "exp_neg_h"):
        corr["c_" + name][1:] = table[name][:-1]
    for j in range(1, n):  # correct the point j reached by predictor step j - 1
        if not second[j - 1]:
            corr["c_rho_t"][j] = 0.5
            continue
        hh = -h[j - 1]
        r = -h[j - 2] / h[j - 1]
        B = np.expm1(hh)
        g1 = B / hh - 1  # hh phi_2(hh)
        g2 = g1 / hh - 0.5  # hh phi_3(hh)
        b1, b2 = g1 / B, 2 * g2 / B
        rho_1 = (b1 - b2) / (1 - r)
        corr["c_rho1_over_r"][j] = rho_1 / r
        corr["c_rho_t"][j] = b1 - rho_1
    keep = np.zeros(n)
    keep[0] = 1.0
    return {**table, "half_over_r": half_over_r, **corr, "keep": keep}


def unipc_init(x):
    """State: (x_s, m_s, m_{s-1}): the corrected previous point and the last two x0_hat (zeros at first)."""
    return (x * 0, x * 0, x * 0)


def unipc_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """One UniPC step, one model evaluation, as diffusers' UniPCMultistepScheduler:
    m_t = x0_hat(x_t) at the predicted point; UniC corrects x_t with it (the model is not re-run at the
    corrected point); UniP-2 then predicts the next point from the corrected x_t and (m_t, m_s)."""
    c = _row(k, x)
    x_s, m_s, m_s1 = state
    m_t = _x0_hat(predict, x, k, prediction_type)
    D_c = m_s + c["c_rho1_over_r"] * (m_s1 - m_s) + c["c_rho_t"] * (m_t - m_s)
    x = c["keep"] * x + _exp_update(x_s, D_c, c["c_sigma_ratio"], c["c_alpha"], c["c_exp_neg_h"])
    D = _dpmpp_D(m_t, m_s, c)
    return _exp_update(x, D, c["sigma_ratio"], c["alpha"], c["exp_neg_h"]), (x, m_t, m_s)
