import numpy as np
import pytest

from minidiff.diffusion import NoiseSchedule, make_betas, posterior_coefficients


def test_linear_and_scaled_linear_endpoints():
    b = make_betas("linear")
    assert b.shape == (1000,) and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    sd = make_betas("scaled_linear")  # SD: linspace in sqrt space, squared
    assert sd[0] == pytest.approx(0.00085) and sd[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.sqrt(sd), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-12)


def test_cosine_schedule_matches_its_alpha_bar_and_is_clipped():
    T = 1000
    b = make_betas("cosine", T)
    f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    ab = np.cumprod(1 - b)
    unclipped = b < 0.999
    # alpha_bar_t = f(t+1) / f(0) wherever no clipping happened before t
    first_clip = np.argmin(unclipped) if not unclipped.all() else T
    np.testing.assert_allclose(ab[:first_clip], f(np.arange(1, first_clip + 1)) / f(0), rtol=1e-9)
    assert b.max() == pytest.approx(0.999) and b[-1] == pytest.approx(0.999)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_tables_are_consistent(name):
    s = NoiseSchedule.from_name(name)
    assert np.all(np.diff(s.alpha_bar) < 0) and 0 < s.alpha_bar[-1] < s.alpha_bar[0] < 1
    np.testing.assert_allclose(s.alpha_bar[1:], s.alpha_bar[:-1] * s.alphas[1:], rtol=1e-12)
    np.testing.assert_allclose(s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(s.snr, s.alpha_bar / (1 - s.alpha_bar))
    # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t <= beta_t, and 0 at t = 0
    np.testing.assert_allclose(s.posterior_variance, (1 - s.alpha_bar_prev) / (1 - s.alpha_bar) * s.betas, rtol=1e-12)
    assert s.posterior_variance[0] == 0 and np.all(s.posterior_variance <= s.betas)


def test_posterior_coefficients_reduce_to_one_step_for_consecutive_timesteps():
    s = NoiseSchedule.from_name("linear")
    c0, ct, var, beta = posterior_coefficients(s.alpha_bar, s.alpha_bar_prev)
    np.testing.assert_allclose(beta, s.betas, rtol=1e-9)
    # DDPM eq. 7: c0 = sqrt(ab_{t-1}) beta_t / (1 - ab_t), ct = sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t)
    np.testing.assert_allclose(c0, np.sqrt(s.alpha_bar_prev) * s.betas / (1 - s.alpha_bar), rtol=1e-9)
    np.testing.assert_allclose(ct, np.sqrt(s.alphas) * (1 - s.alpha_bar_prev) / (1 - s.alpha_bar), rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="quadratic"), "unknown beta schedule 'quadratic'"),
        (dict(name="linear", num_train_timesteps=0), "num_train_timesteps"),
        (dict(name="linear", beta_start=0.1, beta_end=0.01), "beta_start <= beta_end"),
        (dict(name="cosine", beta_start=0.1), "no beta_start"),
    ],
)
def test_bad_schedules_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_betas(**kwargs)


def test_bad_betas_raise_value_error():
    with pytest.raises(ValueError, match="beta_t must lie in"):
        NoiseSchedule([0.1, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(np.ones((2, 2)) * 0.1)
