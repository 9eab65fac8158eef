"""LCM: multistep consistency sampling for latent consistency models (Luo et al. 2023, Algorithm 3;
diffusers' LCMScheduler).

The distilled model f_theta maps any x_t on a trajectory to its end x0, with the boundary-condition
parametrization (Song et al. 2023, eq. 7; s = 10 t, sigma_data = 0.5):

    f_theta(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),
    c_skip = sigma_data^2 / (s^2 + sigma_data^2),    c_out = s / sqrt(s^2 + sigma_data^2)

Between steps the estimate is noised again to the next timestep, x_{t'} = sqrt(ab_t') f + sqrt(1 - ab_t') z;
the last step returns f itself (alpha_bar_next = 1 in the table).  The timesteps are taken from the
``original_inference_steps`` = 50 grid the model was distilled on: t_j = j (T // 50) - 1, j = 50..1.
"""

from __future__ import annotations

import numpy as np

from .samplers import split_prediction
from .schedule import NoiseSchedule

SIGMA_DATA = 0.5


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000, original_inference_steps: int = 50) -> np.ndarray:
    """N of the distillation grid's timesteps, evenly spaced in index from its largest (int64, decreasing)."""
    if not 1 <= num_steps <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_steps ({num_steps}) <= original_inference_steps "
                         f"({original_inference_steps}) <= {num_train_timesteps}")
    origin = (np.arange(original_inference_steps, 0, -1) * (num_train_timesteps // original_inference_steps) - 1)
    return origin[np.floor(np.linspace(0, original_inference_steps, num_steps, endpoint=False)).astype(np.int64)]


def lcm_tables(schedule: NoiseSchedule, num_steps: int, original_inference_steps: int = 50,
               timestep_scaling: float = 10.0) -> dict[str, np.ndarray]:
    """Per-step tables (N rows): ``t``, ``alpha_bar_t``, ``c_skip``, ``c_out``, and ``alpha_bar_next``
    (the next timestep's; 1 on the last step, so that step returns f_theta without noise)."""
    t = lcm_timesteps(num_steps, len(schedule), original_inference_steps)
    ab = schedule.alpha_bar[t]
    s = t * timestep_scaling
    return {
        "t": t.astype(np.float64),
        "alpha_bar_t": ab,
        "c_skip": SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2),
        "c_out": s / (s**2 + SIGMA_DATA**2) ** 0.5,
        "alpha_bar_next": np.append(ab[1:], 1.0),
    }


def lcm_init(x):
    """LCM keeps no state."""
    return ()


def lcm_step(predict, x, state, k, noise=None, *, prediction_type="epsilon"):
    """One model call: f = c_skip x_t + c_out x0_hat, then x_next = sqrt(ab_next) f + sqrt(1 - ab_next) z.
    ``noise`` z may be None only where it is not used (the last step, or a deterministic test)."""
    x0, _ = split_prediction(predict(x, k["t"]), x, k["alpha_bar_t"], prediction_type)
    f = k["c_skip"] * x + k["c_out"] * x0  # the consistency function: the denoised sample
    x_next = k["alpha_bar_next"] ** 0.5 * f
    if noise is not None:
        x_next = x_next + (1 - k["alpha_bar_next"]) ** 0.5 * noise
    return x_next, state
