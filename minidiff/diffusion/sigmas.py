"""The sigma view of a noise schedule, and the sigma grids samplers walk (Karras et al. 2022).

Divide x_t = sqrt(ab) x0 + sqrt(1 - ab) eps by sqrt(ab):

    x_t / sqrt(ab) = x0 + sigma eps,     sigma_t = sqrt((1 - ab_t) / ab_t),   ab = 1 / (1 + sigma^2)

so the forward process is "add noise of scale sigma", and sampling solves the probability-flow ODE

    dx/dsigma = (x - x0_hat(x, sigma)) / sigma = eps_hat          (x in the sigma space)

from sigma_max down to 0.  minidiff's samplers keep x in the *VP space* (x_t, what the UNet sees);
``to_sigma_space`` / ``from_sigma_space`` convert.  A grid is N + 1 sigmas, decreasing, the last 0,
and the N model timesteps t(sigma) (log-sigma interpolation between training steps, as diffusers).

    sigma_from_alpha_bar, alpha_bar_from_sigma, to_sigma_space, from_sigma_space
    karras_sigmas(lo, hi, n, rho=7)   (hi^(1/rho) + i/(n-1) (lo^(1/rho) - hi^(1/rho)))^rho
    exponential_sigmas(lo, hi, n)     log-uniform
    timestep_from_sigma(sigma, train_sigmas)
    sigma_grid(schedule, n, kind, spacing, steps_offset, final, round_timesteps) -> SigmaGrid
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import expand_like
from .samplers import inference_timesteps
from .schedule import NoiseSchedule

SIGMA_KINDS = ("default", "karras", "exponential")


def sigma_from_alpha_bar(alpha_bar):
    """sigma = sqrt((1 - ab) / ab)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def alpha_bar_from_sigma(sigma):
    """ab = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def to_sigma_space(x_t, sigma):
    """x_t (VP, what the model sees) -> x_t / sqrt(ab) = x_t sqrt(1 + sigma^2) = x0 + sigma eps."""
    return x_t * expand_like((1 + sigma**2) ** 0.5, x_t)


def from_sigma_space(x, sigma):
    """x0 + sigma eps -> x_t = x / sqrt(1 + sigma^2)."""
    return x / expand_like((1 + sigma**2) ** 0.5, x)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, uniform in sigma^(1/rho): denser near 0, where the
    picture's details are decided (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, uniform in log sigma."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n))


def timestep_from_sigma(sigma, train_sigmas: np.ndarray) -> np.ndarray:
    """The (fractional) training timestep of each sigma: linear interpolation of log sigma between
    the two training steps around it (diffusers' ``_sigma_to_t``); ``train_sigmas`` increasing in t."""
    log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
    log_sigmas = np.log(train_sigmas)
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clip(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


@dataclass(frozen=True)
class SigmaGrid:
    sigmas: np.ndarray  # (N + 1,) float64, decreasing, sigmas[N] the final one (0 or sigma_min)
    timesteps: np.ndarray  # (N,) float64: the model's t at sigmas[:N]

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alpha_bar(self) -> np.ndarray:
        """ab at every sigma of the grid (N + 1,): 1 at the final sigma 0."""
        return alpha_bar_from_sigma(self.sigmas)


def sigma_grid(schedule: NoiseSchedule, num_steps: int, kind: str = "default", spacing: str = "leading",
               steps_offset: int = 0, final: str = "zero", round_timesteps: bool = False,
               sigma_range: str = "spaced", timesteps=None) -> SigmaGrid:
    """The sigmas a sampler visits.  ``kind``: "default" (the spaced training timesteps, their
    sigmas), "karras" or "exponential" (between the schedule's smallest and largest sigma, each with
    its interpolated timestep; ``round_timesteps`` rounds those, as diffusers' multistep solvers do).
    ``final``: "zero" (x0 at the end) or "sigma_min" (stop at the schedule's smallest sigma).
    ``sigma_range``: Karras / exponential grids span the spaced timesteps' sigmas ("spaced": diffusers'
    Euler, Heun, LMS) or all the training sigmas ("train": its DPM-Solver, UniPC).
    ``timesteps``: explicit decreasing timesteps (a solver's own spacing) instead of the spaced ones."""
    if kind not in SIGMA_KINDS:
        raise ValueError(f"unknown sigma grid {kind!r}; choose one of {', '.join(SIGMA_KINDS)}")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    train = sigma_from_alpha_bar(np.asarray(schedule.alpha_bar, np.float64))
    if timesteps is None:
        timesteps = inference_timesteps(num_steps, len(train), spacing, steps_offset)
    t = np.asarray(timesteps, np.float64)
    sigmas = np.interp(t, np.arange(len(train)), train)
    if kind != "default":
        make = karras_sigmas if kind == "karras" else exponential_sigmas
        lo, hi = (sigmas[-1], sigmas[0]) if sigma_range == "spaced" else (train[0], train[-1])
        sigmas = make(float(lo), float(hi), num_steps)
        t = timestep_from_sigma(sigmas, train)
        if round_timesteps:
            t = np.round(t)
    last = 0.0 if final == "zero" else float(train[0])
    return SigmaGrid(np.append(sigmas, last), t)
