import numpy as np
import pytest

from minidiff.diffusion import (
    GaussianMixture, InferenceSchedule, NoiseSchedule, ddim_invert, ddim_step, ddpm_step, inference_timesteps,
    q_sample, sample, split_prediction, velocity,
)


# --- conversions -----------------------------------------------------------------------------

@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_split_prediction_recovers_x0_and_eps(prediction_type, rng):
    s = NoiseSchedule.from_name("scaled_linear")
    x0, eps = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    for t in (0, 250, 999):
        ab = s.alpha_bar[t]
        xt = q_sample(x0, ab, eps)
        out = {"epsilon": eps, "sample": x0, "v_prediction": velocity(x0, eps, ab)}[prediction_type]
        x0_hat, eps_hat = split_prediction(out, xt, ab, prediction_type)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-9 / ab**0.5)
        np.testing.assert_allclose(eps_hat, eps, atol=1e-9 / (1 - ab) ** 0.5)


def test_velocity_is_a_rotation_of_x0_and_eps(rng):
    """With ab = cos^2(phi): x_t = cos(phi) x0 + sin(phi) eps and v = cos(phi) eps - sin(phi) x0."""
    x0, eps = rng.standard_normal(100), rng.standard_normal(100)
    phi = 0.3
    ab = np.cos(phi) ** 2
    np.testing.assert_allclose(velocity(x0, eps, ab), np.cos(phi) * eps - np.sin(phi) * x0)
    xt = q_sample(x0, ab, eps)
    np.testing.assert_allclose(xt**2 + velocity(x0, eps, ab) ** 2, x0**2 + eps**2)


# --- timesteps -------------------------------------------------------------------------------

def test_stable_diffusion_timesteps():
    """SD: t = arange(0, N) * (1000 // N) + 1, reversed; the last step lands on alpha_bar[0]."""
    isc = InferenceSchedule.stable_diffusion(50)
    np.testing.assert_array_equal(isc.timesteps, (np.arange(50) * 20 + 1)[::-1])
    sd = NoiseSchedule.from_name("scaled_linear")
    assert isc.alpha_bar_prev[-1] == sd.alpha_bar[0]
    np.testing.assert_array_equal(isc.alpha_bar_prev[:-1], sd.alpha_bar[isc.timesteps[1:]])


def test_trailing_and_linspace_spacing():
    np.testing.assert_array_equal(inference_timesteps(4, 1000, "trailing"), [999, 749, 499, 249])
    np.testing.assert_array_equal(inference_timesteps(4, 1000, "linspace"), [999, 666, 333, 0])
    np.testing.assert_array_equal(inference_timesteps(4, 1000, "leading", 1), [751, 501, 251, 1])
    assert len(inference_timesteps(1000, 1000)) == 1000


def test_set_alpha_to_one():
    s = NoiseSchedule.from_name("linear")
    assert InferenceSchedule.create(s, 10, set_alpha_to_one=True).alpha_bar_prev[-1] == 1.0
    assert InferenceSchedule.create(s, 10, set_alpha_to_one=False).alpha_bar_prev[-1] == s.alpha_bar[0]


# --- one step identities ---------------------------------------------------------------------

def test_ddim_with_eta_one_is_the_ddpm_step(rng):
    """DDIM with sigma = sqrt(beta_tilde) and DDPM with beta_tilde are the same update (DDIM §4.1)."""
    s = NoiseSchedule.from_name("linear")
    isc = InferenceSchedule.create(s, 20)
    for i in range(len(isc)):
        x, out, z = (rng.standard_normal((3, 5)) for _ in range(3))
        a, _ = ddim_step(x, out, isc.alpha_bar_t[i], isc.alpha_bar_prev[i], eta=1.0, noise=z)
        b, _ = ddpm_step(x, out, isc.alpha_bar_t[i], isc.alpha_bar_prev[i], z)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ddim_with_the_true_noise_lands_on_the_forward_marginal(rng):
    """If the model knows the true eps, eta=0 DDIM moves x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps
    exactly to sqrt(ab_prev) x0 + sqrt(1-ab_prev) eps: the same x0 and eps, less noise."""
    s = NoiseSchedule.from_name("cosine")
    x0, eps = rng.standard_normal(50), rng.standard_normal(50)
    x_prev, x0_hat = ddim_step(q_sample(x0, s.alpha_bar[700], eps), eps, s.alpha_bar[700], s.alpha_bar[300])
    np.testing.assert_allclose(x_prev, q_sample(x0, s.alpha_bar[300], eps), atol=1e-12)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-12)


def test_ddpm_last_step_adds_no_noise(rng):
    x, out, z = (rng.standard_normal(7) for _ in range(3))
    for variance in ("beta_tilde", "beta"):
        a, _ = ddpm_step(x, out, 0.9, 1.0, z, variance)
        b, _ = ddpm_step(x, out, 0.9, 1.0, 0 * z, variance)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_float32_steps_stay_float32_and_accurate(name, rng):
    """float32 latents stay float32 (table entries are float64 but act as Python scalars), and the
    float32 step is within float32 rounding of the float64 one at every timestep: coefficients
    such as beta = 1 - alpha_bar_t / alpha_bar_prev are formed in double precision."""
    s = NoiseSchedule.from_name(name)
    isc = InferenceSchedule.create(s, 1000 - (name == "scaled_linear"), steps_offset=int(name == "scaled_linear"))
    worst = 0.0
    for i in range(len(isc)):
        x, out, z = (rng.standard_normal((4, 16)) for _ in range(3))
        args = (isc.alpha_bar_t[i], isc.alpha_bar_prev[i])
        for step in (lambda *a: ddpm_step(*a[:2], *args, a[2])[0], lambda *a: ddim_step(*a[:2], *args, 1.0, a[2])[0]):
            y32 = step(*(v.astype(np.float32) for v in (x, out, z)))
            y64 = step(*(v.astype(np.float32).astype(np.float64) for v in (x, out, z)))
            assert y32.dtype == np.float32
            worst = max(worst, np.abs(y32 - y64).max() / np.abs(y64).max())
    assert worst < 2e-6, worst


# --- sampling the Gaussian-mixture oracle ----------------------------------------------------

MIX_1D = GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.3**2, 0.5**2])
MIX_2D = GaussianMixture(
    [0.2, 0.5, 0.3],
    [[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]],
    [[[0.3, 0.1], [0.1, 0.2]], [[0.4, -0.15], [-0.15, 0.3]], [[0.2, 0.0], [0.0, 0.5]]],
)

# Sampler bias measured with the exact eps (benchmarks/sampler_accuracy.py: n = 200,000, linear
# schedule, max over components, 1-D / 2-D mixture):
#   DDPM 1000 steps: weights 0.0017 / 0.0013, means 0.0029 / 0.0044, covariance rel. 0.029 / 0.019
#   DDIM   50 steps: weights 0.0036 / 0.0018, means 0.0228 / 0.0481, covariance rel. 0.068 / 0.065
# Tolerance = a bias allowance above those + 4 standard errors at the test's sample size.
BIAS = {"ddpm": dict(weight=0.005, mean=0.01, var=0.05), "ddim": dict(weight=0.008, mean=0.06, var=0.10)}


def _check_mixture(gm, x, bias, n_sigma=4.0):
    n = len(x)
    k = gm.responsibilities(x).argmax(1)  # components are well separated: assign each sample to one
    report = []
    for j, w in enumerate(gm.weights):
        xj = x[k == j]
        w_hat = len(xj) / n
        assert abs(w_hat - w) < bias["weight"] + n_sigma * np.sqrt(w * (1 - w) / n), ("weight", j, w_hat, w)
        cov = gm.covariances[j]
        m_err = np.abs(xj.mean(0) - gm.means[j])
        assert np.all(m_err < bias["mean"] + n_sigma * np.sqrt(np.diag(cov) / (n * w))), ("mean", j, m_err)
        c_hat = np.cov(xj.T).reshape(cov.shape)
        rel = np.linalg.norm(c_hat - cov) / np.linalg.norm(cov)  # relative Frobenius error
        assert rel < bias["var"] + n_sigma * np.sqrt(2 / (n * w)), ("covariance", j, rel)
        report.append((w_hat - w, m_err.max(), rel))
    return report


@pytest.mark.parametrize("gm", [MIX_1D, MIX_2D], ids=["1d", "2d"])
@pytest.mark.parametrize("sampler,steps", [pytest.param("ddpm", 1000, marks=pytest.mark.slow), ("ddim", 50)])
def test_oracle_sampling_reproduces_the_mixture(gm, sampler, steps):
    rng = np.random.default_rng(42)
    s = NoiseSchedule.from_name("linear")
    isc = InferenceSchedule.create(s, steps)
    x = sample(lambda x, t: gm.eps_oracle(x, s.alpha_bar[t]), rng.standard_normal((20_000, gm.dim)), isc,
               sampler, rng=rng)
    _check_mixture(gm, x, BIAS[sampler])


def test_a_wrong_sampler_fails_the_oracle_check():
    """The check has teeth: DDIM whose x0 term uses alpha_bar_t instead of alpha_bar_prev is caught."""
    rng = np.random.default_rng(0)
    s = NoiseSchedule.from_name("linear")
    isc = InferenceSchedule.create(s, 50)
    broken = InferenceSchedule(isc.timesteps, isc.alpha_bar_t, np.sqrt(isc.alpha_bar_prev * isc.alpha_bar_t))
    x = sample(lambda x, t: MIX_1D.eps_oracle(x, s.alpha_bar[t]), rng.standard_normal((20_000, 1)), broken, "ddim")
    with pytest.raises(AssertionError):
        _check_mixture(MIX_1D, x, BIAS["ddim"])


def test_ddim_inversion_round_trip():
    """x0 -> x_T by inversion -> x0 by eta=0 DDIM.  The only error is the inversion's
    eps(x_{t_prev}, t) ~ eps(x_t, t) approximation, first order in the step size.
    Measured RMS error (2-D mixture, data std ~1.4, linear schedule): 50 steps 0.052, 200 steps 0.013,
    1000 steps 0.0031."""
    rng = np.random.default_rng(1)
    s = NoiseSchedule.from_name("linear")
    x0, _ = MIX_2D.sample(2000, rng)
    eps = lambda x, t: MIX_2D.eps_oracle(x, s.alpha_bar[t])  # noqa: E731
    rms = {}
    for steps in (50, 200):
        isc = InferenceSchedule.create(s, steps)
        xT = ddim_invert(eps, x0, isc)
        rms[steps] = np.sqrt(np.mean((sample(eps, xT, isc, "ddim") - x0) ** 2))
        # the inverted latents look like N(0, I)
        assert np.all(np.abs(xT.mean(0)) < 0.1) and np.all(np.abs(xT.std(0) - 1) < 0.1)
    assert rms[50] < 0.08 and rms[200] < 0.02
    assert 3.0 < rms[50] / rms[200] < 5.0  # first order: 4x the steps, ~4x smaller error


def test_oracle_score_is_the_gradient_of_log_prob(rng):
    x = rng.standard_normal((20, 2)) * 2
    h = 1e-5
    fd = np.stack([(MIX_2D.log_prob(x + h * e) - MIX_2D.log_prob(x - h * e)) / (2 * h) for e in np.eye(2)], 1)
    np.testing.assert_allclose(MIX_2D.score(x), fd, rtol=1e-6, atol=1e-8)


def test_oracle_is_the_conditional_mean_of_the_noise(rng):
    """E[eps | x_t] is the least-squares predictor: it beats any perturbation of itself."""
    s = NoiseSchedule.from_name("linear")
    x0, _ = MIX_1D.sample(100_000, rng)
    eps = rng.standard_normal(x0.shape)
    ab = s.alpha_bar[300]
    xt = q_sample(x0, ab, eps)
    pred = MIX_1D.eps_oracle(xt, ab)
    mse = np.mean((pred - eps) ** 2)
    for delta in (lambda p: 1.05 * p, lambda p: 0.95 * p, lambda p: p + 0.05, lambda p: p + 0.05 * np.tanh(xt)):
        assert mse < np.mean((delta(pred) - eps) ** 2)
    assert abs(np.mean(pred - eps)) < 4 * np.sqrt(mse / len(eps))


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, -3, 1001, 2.5])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="num_inference_steps must be an integer in"):
        inference_timesteps(n, 1000)


def test_bad_spacing_offset_prediction_and_sampler():
    s = NoiseSchedule.from_name("linear")
    with pytest.raises(ValueError, match="unknown timestep spacing 'middle'"):
        inference_timesteps(10, 1000, "middle")
    with pytest.raises(ValueError, match="steps_offset=1 moves the timesteps"):
        inference_timesteps(1000, 1000, "leading", 1)
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="unknown prediction_type 'score'"):
        ddim_step(x, x, 0.5, 0.6, prediction_type="score")
    with pytest.raises(ValueError, match="needs the Gaussian noise"):
        ddim_step(x, x, 0.5, 0.6, eta=0.5)
    with pytest.raises(ValueError, match="unknown DDPM variance"):
        ddpm_step(x, x, 0.5, 0.6, x, variance="learned")
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, x, InferenceSchedule.create(s, 5), "euler")
    with pytest.raises(ValueError, match="pass rng"):
        sample(lambda x, t: x, x, InferenceSchedule.create(s, 5), "ddpm")


def test_shape_mismatch_in_steps():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"x_t \(2, 3\), model_output \(2, 4\)"):
        ddim_step(x, np.zeros((2, 4)), 0.5, 0.6)
    with pytest.raises(ValueError, match=r"noise \(3, 3\)"):
        ddpm_step(x, x, 0.5, 0.6, np.zeros((3, 3)))
