"""PLMS: pseudo linear multistep sampling (Liu et al. 2022, PNDM), as SD 1.x's default scheduler
(diffusers' PNDMScheduler with skip_prk_steps=True).

Each step is the DDIM transfer phi (PNDM eq. 9, ``ddim_step`` with eta = 0) from t to t - delta,
fed a 4th-order Adams-Bashforth combination of the last model outputs e_t (PNDM eq. 12):

    e'_t = (55 e_t - 59 e_{t+d} + 37 e_{t+2d} - 9 e_{t+3d}) / 24,    x_{t-d} = phi(x_t, e'_t, t, t-d)

with no history yet, a warm-up (diffusers' order for skip_prk_steps): step 0 uses e_t; step 1
evaluates the model again at t - d and redoes the first jump from the saved x_t with
(e_t + e_{t-d}) / 2 (the model runs N + 1 times for N timesteps: t_1 is visited twice);
then the 2nd and 3rd order formulas (3 e_0 - e_1) / 2 and (23 e_0 - 16 e_1 + 5 e_2) / 12.
These choices depend only on the step index, so they live in per-step coefficient tables.
Like diffusers, the outputs are combined as given (eps or v) and then converted by
``split_prediction`` at the current sample.
"""

from __future__ import annotations

import numpy as np

from .samplers import ddim_step, inference_timesteps
from .schedule import NoiseSchedule

# Adams-Bashforth coefficients of (e_new, h1, h2, h3), by the number of outputs available.
_ADAMS_BASHFORTH = {
    1: (1.0, 0.0, 0.0, 0.0),
    2: (3 / 2, -1 / 2, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def plms_timesteps(num_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading",
                   steps_offset: int = 1) -> np.ndarray:
    """The N + 1 model timesteps (diffusers' ``plms_timesteps``): t_0, t_1, t_1, t_2, ..., t_{N-1}."""
    t = inference_timesteps(num_steps, num_train_timesteps, spacing, steps_offset)
    return np.concatenate([t[:1], t[1:2], t[1:]]) if num_steps > 1 else t


def plms_tables(schedule: NoiseSchedule, num_steps: int, spacing: str = "leading", steps_offset: int = 1,
                set_alpha_to_one: bool = False) -> dict[str, np.ndarray]:
    """Per-model-call tables (N + 1 rows): ``t``; the jump ``alpha_bar_t -> alpha_bar_prev``;
    ``c_new, c_1, c_2, c_3`` (weights of the new output and the stored h1, h2, h3);
    ``use_x, use_cur`` (jump from x or from the saved sample); ``push`` (store the new output);
    ``save`` (save x as the sample the next step restarts from).  Defaults: SD 1.x's config."""
    T = len(schedule)
    d = T // num_steps  # diffusers: t - delta is always t - T // N
    final = 1.0 if set_alpha_to_one else float(schedule.alpha_bar[0])

    def ab(t):
        return float(schedule.alpha_bar[t]) if t >= 0 else final

    rows, n_outputs = [], 0
    for i, t in enumerate(plms_timesteps(num_steps, T, spacing, steps_offset)):
        t = int(t)
        if i == 1:  # redo the first jump t_0 -> t_1 with the mean of both outputs, from the saved x_{t_0}
            t_from, t_to, push, coefs = t + d, t, 0.0, (0.5, 0.5, 0.0, 0.0)
        else:
            n_outputs = min(n_outputs, 3) + 1
            t_from, t_to, push, coefs = t, t - d, 1.0, _ADAMS_BASHFORTH[n_outputs]
        rows.append(dict(t=float(t), alpha_bar_t=ab(t_from), alpha_bar_prev=ab(t_to),
                         c_new=coefs[0], c_1=coefs[1], c_2=coefs[2], c_3=coefs[3],
                         use_x=float(i != 1), use_cur=float(i == 1), push=push, save=float(i == 0)))
    return {name: np.array([r[name] for r in rows], np.float64) for name in rows[0]}


def plms_init(x):
    """State (h1, h2, h3, cur): the last three stored model outputs, newest first, and the saved sample."""
    return tuple(x * 0 for _ in range(4))


def plms_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """One model call and one PLMS step (row ``k`` of ``plms_tables``); ``noise`` is unused."""
    h1, h2, h3, cur = state
    e = predict(x, k["t"])
    e_prime = k["c_new"] * e + k["c_1"] * h1 + k["c_2"] * h2 + k["c_3"] * h3  # linear multistep
    x_from = k["use_x"] * x + k["use_cur"] * cur
    x_next, _ = ddim_step(x_from, e_prime, k["alpha_bar_t"], k["alpha_bar_prev"], 0.0, None, prediction_type)
    p = k["push"]  # 1: shift the history (h1, h2, h3) <- (e, h1, h2); 0: keep it
    state = (p * e + (1 - p) * h1, p * h1 + (1 - p) * h2, p * h2 + (1 - p) * h3, k["save"] * x)
    return x_next, state
