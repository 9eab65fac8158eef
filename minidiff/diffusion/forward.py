"""The forward (noising) process of DDPM, as a Markov chain and in closed form.

    one step     q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1},  beta_t I )
    closed form  q(x_t | x0)      = N( sqrt(alpha_bar_t) x0,      (1 - alpha_bar_t) I )
    posterior    q(x_{t-1} | x_t, x0) = N( mu_tilde(x_t, x0),     beta_tilde_t I )

The caller supplies the noise eps ~ N(0, I), so every function is deterministic arithmetic.
Coefficients come from a :class:`~minidiff.diffusion.schedule.NoiseSchedule`, e.g.
``q_sample(x0, sched.alpha_bar[t], eps)``; a coefficient may be a scalar or hold one value per
example (t of shape (B,)).
"""

from __future__ import annotations

from ._arrays import check_shapes, expand_like
from .schedule import posterior_coefficients


def q_step(x_prev, beta_t, noise):
    """One Markov step: x_t = sqrt(1 - beta_t) * x_{t-1} + sqrt(beta_t) * eps."""
    check_shapes(x_prev=x_prev, noise=noise)
    beta_t = expand_like(beta_t, x_prev)
    return (1 - beta_t) ** 0.5 * x_prev + beta_t**0.5 * noise


def q_sample(x0, alpha_bar_t, noise):
    """Closed form: x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps."""
    check_shapes(x0=x0, noise=noise)
    alpha_bar_t = expand_like(alpha_bar_t, x0)
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def q_posterior(x0, x_t, alpha_bar_t, alpha_bar_prev):
    """Mean and variance of q(x_prev | x_t, x0):

        mu_tilde   = sqrt(alpha_bar_prev) beta / (1 - alpha_bar_t) * x0
                     + sqrt(1 - beta) (1 - alpha_bar_prev) / (1 - alpha_bar_t) * x_t
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta,   beta = 1 - alpha_bar_t / alpha_bar_prev

    For consecutive steps pass ``sched.alpha_bar[t], sched.alpha_bar_prev[t]``.
    """
    check_shapes(x0=x0, x_t=x_t)
    c0, ct, var, _ = posterior_coefficients(alpha_bar_t, alpha_bar_prev)
    mean = expand_like(c0, x0) * x0 + expand_like(ct, x0) * x_t
    return mean, expand_like(var, x0)
