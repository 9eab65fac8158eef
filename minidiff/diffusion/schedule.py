"""Noise schedules: beta_t -> alpha_t -> alpha_bar_t, and the coefficient tables built from them.

Indexing convention (the one diffusers and the SD checkpoints use): a timestep index
t in {0, ..., T-1} is the paper's t+1.  x_t has been noised with

    alpha_bar_t = prod_{s <= t} alpha_s = prod_{s <= t} (1 - beta_s),

and x0 is the clean data (alpha_bar = 1).  Every table below is a NumPy float64 array of length T.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")

# Default (beta_start, beta_end) per schedule: DDPM's linear schedule, and Stable Diffusion's.
DEFAULT_BETA_RANGE = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def make_betas(
    name: str,
    num_train_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> np.ndarray:
    """The variances beta_t of the forward process, t = 0..T-1.

    - ``linear`` (Ho et al., DDPM): beta_t = linspace(1e-4, 0.02, T)
    - ``scaled_linear`` (Stable Diffusion): beta_t = linspace(sqrt(0.00085), sqrt(0.012), T)^2
    - ``cosine`` (Nichol & Dhariwal): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi/2),
      beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at ``max_beta`` = 0.999
    """
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    T = int(num_train_timesteps)
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start/beta_end")
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((t + 1) / T) / f(t / T), max_beta) for t in range(T)])
    if name not in DEFAULT_BETA_RANGE:
        raise ValueError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    lo, hi = DEFAULT_BETA_RANGE[name]
    lo = lo if beta_start is None else beta_start
    hi = hi if beta_end is None else beta_end
    if not 0 < lo <= hi < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={lo}, beta_end={hi}")
    if name == "linear":
        return np.linspace(lo, hi, T, dtype=np.float64)
    return np.linspace(lo**0.5, hi**0.5, T, dtype=np.float64) ** 2  # scaled_linear


def posterior_coefficients(alpha_bar_t, alpha_bar_prev):
    """Coefficients of q(x_prev | x_t, x0) = N(c0 * x0 + ct * x_t, var) for a jump from
    alpha_bar_t back to alpha_bar_prev (>= alpha_bar_t).  With consecutive steps this is DDPM's
    posterior (eq. 6-7); with a strided inference schedule it is the same formula with the
    effective beta = 1 - alpha_bar_t / alpha_bar_prev.

        beta      = 1 - alpha_bar_t / alpha_bar_prev
        c0        = sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t)
        ct        = sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        var       = beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta

    Plain arithmetic: works on floats, NumPy arrays and traced JAX values alike.
    Returns (c0, ct, var, beta).
    """
    beta = 1 - alpha_bar_t / alpha_bar_prev
    c0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar_t)
    ct = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    var = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta
    return c0, ct, var, beta


class NoiseSchedule:
    """A training noise schedule and every per-timestep coefficient the forward process and the
    samplers read, precomputed as float64 arrays of length T."""

    def __init__(self, betas):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("every beta_t must lie in (0, 1)")
        self.betas = betas                                     # beta_t
        self.alphas = 1.0 - betas                              # alpha_t = 1 - beta_t
        self.alpha_bar = np.cumprod(self.alphas)               # alpha_bar_t = prod_{s<=t} alpha_s
        self.alpha_bar_prev = np.append(1.0, self.alpha_bar[:-1])  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
        self.sqrt_alpha_bar = np.sqrt(self.alpha_bar)
        self.sqrt_one_minus_alpha_bar = np.sqrt(1.0 - self.alpha_bar)
        self.snr = self.alpha_bar / (1.0 - self.alpha_bar)     # signal-to-noise ratio alpha_bar / (1 - alpha_bar)
        # q(x_{t-1} | x_t, x0) = N(coef_x0 * x0 + coef_xt * x_t, posterior_variance)
        self.posterior_coef_x0, self.posterior_coef_xt, self.posterior_variance, _ = posterior_coefficients(
            self.alpha_bar, self.alpha_bar_prev
        )

    @classmethod
    def from_name(cls, name: str = "linear", num_train_timesteps: int = 1000, **kwargs) -> "NoiseSchedule":
        """``NoiseSchedule.from_name("scaled_linear")`` is Stable Diffusion's training schedule."""
        return cls(make_betas(name, num_train_timesteps, **kwargs))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    def __len__(self) -> int:
        return len(self.betas)

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={len(self)}, beta=[{self.betas[0]:.3g} .. {self.betas[-1]:.3g}], "
            f"alpha_bar_T-1={self.alpha_bar[-1]:.3g})"
        )
