"""Statistical tests of the forward process.  Tolerances are n_sigma standard errors of the
estimate at the test's sample size (SE of a mean: sqrt(var / n); of a variance: var sqrt(2 / (n-1)))."""

import numpy as np
import pytest

from minidiff.diffusion import NoiseSchedule, q_posterior, q_sample, q_step

N_SIGMA = 5.0  # two-sided false-alarm probability ~6e-7 per check; seeds are fixed anyway


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_markov_chain_matches_closed_form(name, rng):
    """Iterate x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps from a fixed x0; at several t the
    sample mean and variance of x_t match q(x_t | x0) = N(sqrt(ab_t) x0, (1 - ab_t) I)."""
    s = NoiseSchedule.from_name(name)
    n = 20_000
    x0 = np.array([1.5, -0.7, 0.2])
    x = np.broadcast_to(x0, (n, 3)).copy()
    checkpoints = {0, 9, 99, 499, 999}
    for t in range(1000):
        x = q_step(x, s.betas[t], rng.standard_normal(x.shape))
        if t in checkpoints:
            mean, var = s.sqrt_alpha_bar[t] * x0, 1 - s.alpha_bar[t]
            se_mean, se_var = np.sqrt(var / n), var * np.sqrt(2 / (n - 1))
            assert np.all(np.abs(x.mean(0) - mean) < N_SIGMA * se_mean), (t, x.mean(0), mean)
            assert np.all(np.abs(x.var(0, ddof=1) - var) < N_SIGMA * se_var), (t, x.var(0), var)
            # and the closed form draws the same distribution
            xc = q_sample(np.broadcast_to(x0, (n, 3)), s.alpha_bar[t], rng.standard_normal((n, 3)))
            assert np.all(np.abs(xc.mean(0) - mean) < N_SIGMA * se_mean)
            assert np.all(np.abs(xc.var(0, ddof=1) - var) < N_SIGMA * se_var)


@pytest.mark.parametrize("t", [1, 10, 300, 999])
def test_posterior_is_the_conditional_of_the_chain(t, rng):
    """Draw x_{t-1} ~ q(x_{t-1} | x0), then x_t by one Markov step.  The residual
    x_{t-1} - mu_tilde(x_t, x0) must have mean 0, variance beta_tilde_t and no correlation with
    x_t: that is exactly q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde)."""
    s = NoiseSchedule.from_name("linear")
    n, x0 = 200_000, np.full(200_000, 0.8)
    x_prev = q_sample(x0, s.alpha_bar[t - 1], rng.standard_normal(n))
    x_t = q_step(x_prev, s.betas[t], rng.standard_normal(n))
    mean, var = q_posterior(x0, x_t, s.alpha_bar[t], s.alpha_bar_prev[t])
    r = x_prev - mean
    assert abs(r.mean()) < N_SIGMA * np.sqrt(var / n)
    assert abs(r.var(ddof=1) - var) < N_SIGMA * var * np.sqrt(2 / (n - 1))
    assert abs(np.corrcoef(r, x_t)[0, 1]) < N_SIGMA / np.sqrt(n)
    assert var == pytest.approx(s.posterior_variance[t])


def test_per_example_timesteps_broadcast(rng):
    s = NoiseSchedule.from_name("scaled_linear")
    x0, eps = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    t = np.array([0, 10, 500, 999])
    xt = q_sample(x0, s.alpha_bar[t], eps)
    for i in range(4):
        np.testing.assert_allclose(xt[i], q_sample(x0[i], s.alpha_bar[t[i]], eps[i]), rtol=1e-12)


def test_shape_mismatch_is_a_value_error(rng):
    s = NoiseSchedule.from_name("linear")
    with pytest.raises(ValueError, match=r"x0 \(2, 3\), noise \(2, 4\)"):
        q_sample(np.zeros((2, 3)), s.alpha_bar[5], np.zeros((2, 4)))
    with pytest.raises(ValueError, match="x_prev"):
        q_step(np.zeros(3), s.betas[5], np.zeros(4))
    with pytest.raises(ValueError, match="one entry per example"):
        q_sample(np.zeros((2, 3)), s.alpha_bar[[1, 2, 3]], np.zeros((2, 3)))
