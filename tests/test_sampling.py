"""The compiled JAX reverse chain (minidiff.sampling) against the NumPy loop it must equal."""

import numpy as np
import pytest

from minidiff.diffusion import InferenceSchedule, NoiseSchedule, sample

jax = pytest.importorskip("jax")
jnp = jax.numpy
from minidiff.sampling import Sampler, noise_keys  # noqa: E402

W = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32) * 0.3


def model_fn(params, x, t, cond):
    """A fixed "network" that depends on x, t and the parameters: tanh(x W + t / T) * scale."""
    return jnp.tanh(x @ W + t[:, None] / 1000.0) * params["scale"]


def numpy_model(x, t):
    return np.tanh(x @ W + t / 1000.0) * 0.9


class Replay:
    """Hands minidiff.diffusion.sample the noise the JAX sampler drew from its key, step by step."""

    def __init__(self, draws):
        self.draws = iter(draws)

    def standard_normal(self, shape):
        return np.asarray(next(self.draws), np.float64)


@pytest.mark.parametrize("sampler, eta, variance, prediction_type", [
    ("ddim", 0.0, "beta_tilde", "epsilon"),
    ("ddim", 1.0, "beta_tilde", "v_prediction"),
    ("ddpm", 0.0, "beta_tilde", "epsilon"),
    ("ddpm", 0.0, "beta", "v_prediction"),
])
def test_scan_loop_equals_the_numpy_loop(sampler, eta, variance, prediction_type):
    isc = InferenceSchedule.create(NoiseSchedule.from_name("linear"), 25)
    shape, key = (64, 3), jax.random.key(7)
    s = Sampler(model_fn, isc, sampler, eta=eta, prediction_type=prediction_type, variance=variance)
    got, trajectory = s({"scale": jnp.float32(0.9)}, key, shape, return_trajectory=True)

    k_T, step_keys = noise_keys(key, len(isc))  # the same noise, drawn outside
    x_T = np.asarray(jax.random.normal(k_T, shape), np.float64)
    draws = [jax.random.normal(k, shape) for k in step_keys]
    want = sample(numpy_model, x_T, isc, sampler, eta=eta, rng=Replay(draws), prediction_type=prediction_type,
                  variance=variance)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert trajectory.shape == (len(isc) + 1, *shape)
    np.testing.assert_array_equal(trajectory[0], np.asarray(jax.random.normal(k_T, shape)))
    np.testing.assert_array_equal(trajectory[-1], got)


def test_a_new_seed_does_not_recompile():
    traces = []

    def counting_model(params, x, t, cond):
        traces.append(x.shape)  # runs only while JAX traces the function
        return model_fn(params, x, t, cond)

    s = Sampler(counting_model, InferenceSchedule.create(NoiseSchedule.from_name("linear"), 10), "ddpm")
    params = {"scale": jnp.float32(1.0)}
    a = s(params, jax.random.key(0), (8, 3))
    n = len(traces)
    b = s(params, jax.random.key(1), (8, 3))
    c = s({"scale": jnp.float32(0.5)}, jax.random.key(2), (8, 3))  # new parameter values: same program
    assert n >= 1 and len(traces) == n
    assert not np.allclose(a, b) and np.all(np.isfinite(c))
    np.testing.assert_array_equal(s(params, jax.random.key(0), (8, 3)), a)  # a pure function of the key


def test_classifier_free_guidance_mixes_the_two_branches():
    def cond_model(params, x, t, cond):
        return model_fn(params, x, t, None) + 0.2 * cond[:, None]

    isc = InferenceSchedule.create(NoiseSchedule.from_name("linear"), 10)
    s = Sampler(cond_model, isc)
    p, key = {"scale": jnp.float32(1.0)}, jax.random.key(3)
    c, u = jnp.ones(16), jnp.zeros(16)
    plain_c, plain_u = s(p, key, (16, 3), cond=c), s(p, key, (16, 3), cond=u)
    np.testing.assert_allclose(s(p, key, (16, 3), cond=c, uncond=u, guidance_scale=1.0), plain_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s(p, key, (16, 3), cond=c, uncond=u, guidance_scale=0.0), plain_u, rtol=1e-5, atol=1e-5)
    # the model is affine in cond, so guidance with scale s equals conditioning on cond = s
    np.testing.assert_allclose(s(p, key, (16, 3), cond=c, uncond=u, guidance_scale=3.0),
                               s(p, key, (16, 3), cond=3 * c), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_clear_errors():
    isc = InferenceSchedule.create(NoiseSchedule.from_name("linear"), 5)
    with pytest.raises(ValueError, match="unknown sampler"):
        Sampler(model_fn, isc, "euler")
    with pytest.raises(ValueError, match="prediction_type"):
        Sampler(model_fn, isc, prediction_type="eps")
    with pytest.raises(ValueError, match="exactly one"):
        Sampler(model_fn, isc)({"scale": 1.0}, jax.random.key(0))
