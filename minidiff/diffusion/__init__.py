"""The mathematics of diffusion in pure NumPy (no JAX import here).

- :mod:`.schedule`  beta schedules and the coefficient tables (alpha_bar_t, posterior coefficients, SNR)
- :mod:`.forward`   q(x_t | x_{t-1}), q(x_t | x0), q(x_{t-1} | x_t, x0)
- :mod:`.samplers`  eps / x0 / v conversions, inference timesteps, DDPM and DDIM steps, DDIM inversion
- :mod:`.oracle`    a Gaussian mixture with its exact noise predictor, to test samplers
"""

from .forward import q_posterior, q_sample, q_step
from .oracle import GaussianMixture
from .samplers import (
    InferenceSchedule,
    ddim_invert,
    ddim_sigma,
    ddim_step,
    ddpm_step,
    eps_from_x0,
    inference_timesteps,
    sample,
    split_prediction,
    velocity,
    x0_eps_from_v,
    x0_from_eps,
)
from .schedule import NoiseSchedule, make_betas, posterior_coefficients

__all__ = [
    "GaussianMixture", "InferenceSchedule", "NoiseSchedule", "ddim_invert", "ddim_sigma", "ddim_step",
    "ddpm_step", "eps_from_x0", "inference_timesteps", "make_betas", "posterior_coefficients", "q_posterior",
    "q_sample", "q_step", "sample", "split_prediction", "velocity", "x0_eps_from_v", "x0_from_eps",
]
