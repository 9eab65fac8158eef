"""The NumPy step functions run unchanged on JAX arrays inside jax.jit and jax.lax.scan."""

import subprocess
import sys

import numpy as np
import pytest

from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_step, ddpm_step, q_sample, sample

jax = pytest.importorskip("jax")
jnp = jax.numpy


def test_importing_the_numpy_core_does_not_import_jax():
    code = (
        "import sys, minidiff, minidiff.diffusion as d; "
        "d.sample; bad = [m for m in ('jax', 'jaxlib', 'flax', 'optax', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_steps_under_jit_match_numpy(prediction_type, rng):
    isc = InferenceSchedule.stable_diffusion(25)
    ab_t, ab_prev = jnp.asarray(isc.alpha_bar_t, jnp.float32), jnp.asarray(isc.alpha_bar_prev, jnp.float32)

    @jax.jit
    def steps(i, x, out, z):  # the index i is traced: coefficients are gathered inside the graph
        a = ddim_step(x, out, ab_t[i], ab_prev[i], 0.0, None, prediction_type)[0]
        b = ddim_step(x, out, ab_t[i], ab_prev[i], 1.0, z, prediction_type)[0]
        c = ddpm_step(x, out, ab_t[i], ab_prev[i], z, "beta", prediction_type)[0]
        return a, b, c

    for i in (0, 12, 24):
        x, out, z = (rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for _ in range(3))
        got = steps(i, x, out, z)
        want = (
            ddim_step(x, out, isc.alpha_bar_t[i], isc.alpha_bar_prev[i], 0.0, None, prediction_type)[0],
            ddim_step(x, out, isc.alpha_bar_t[i], isc.alpha_bar_prev[i], 1.0, z, prediction_type)[0],
            ddpm_step(x, out, isc.alpha_bar_t[i], isc.alpha_bar_prev[i], z, "beta", prediction_type)[0],
        )
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-5 * np.abs(w).max())


def test_q_sample_with_per_example_timesteps_under_jit(rng):
    s = NoiseSchedule.from_name("linear")
    table = jnp.asarray(s.alpha_bar, jnp.float32)
    x0, eps = rng.standard_normal((3, 4, 4, 2)).astype(np.float32), rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = np.array([3, 400, 990])
    got = jax.jit(lambda x0, t, eps: q_sample(x0, table[t], eps))(x0, t, eps)
    np.testing.assert_allclose(np.asarray(got), q_sample(x0, s.alpha_bar[t], eps), rtol=1e-5, atol=1e-6)


def test_a_scan_loop_matches_the_numpy_loop(rng):
    """A whole DDIM (eta=1) run as one jax.lax.scan equals minidiff.diffusion.sample given the same noise."""
    s = NoiseSchedule.from_name("scaled_linear")
    isc = InferenceSchedule.create(s, 20, steps_offset=1, set_alpha_to_one=False)
    W = rng.standard_normal((6, 6)).astype(np.float32) * 0.3  # a fixed linear "model"
    x_T = rng.standard_normal((5, 6)).astype(np.float32)
    noise = rng.standard_normal((len(isc), 5, 6)).astype(np.float32)

    def body(x, step):
        ab_t, ab_prev, z = step
        return ddim_step(x, x @ W, ab_t, ab_prev, 1.0, z)[0], None

    xs = (jnp.asarray(isc.alpha_bar_t, jnp.float32), jnp.asarray(isc.alpha_bar_prev, jnp.float32), noise)
    got = jax.jit(lambda x: jax.lax.scan(body, x, xs)[0])(x_T)

    draws = iter(noise)

    class Replay:  # hands sample() the same noise, step by step
        def standard_normal(self, shape):
            return next(draws)

    want = sample(lambda x, t: x @ W, x_T.astype(np.float64), isc, "ddim", eta=1.0, rng=Replay())
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
