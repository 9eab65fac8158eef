"""PLMS and LCM: whole trajectories equal diffusers' PNDMScheduler(skip_prk_steps=True) and
LCMScheduler driven the same way (same fake model, same initial latents, same per-step noise),
and the PLMS step runs unchanged inside jax.jit / jax.lax.scan."""

import numpy as np
import pytest

from minidiff.diffusion import NoiseSchedule
from minidiff.diffusion.lcm import lcm_init, lcm_step, lcm_tables
from minidiff.diffusion.plms import plms_init, plms_step, plms_tables

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5  # max |ours - diffusers| / max |diffusers|
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 8, 8)


def fake_model(tanh):
    """A fixed smooth function of x and t, standing in for the UNet."""
    return lambda x, t: 0.5 * tanh(x) + 1e-3 * t * (x * 0 + 1)


def run(init, step, tables, predict, x, noise, prediction_type):
    """The NumPy driver loop: one model call per table row."""
    state = init(x)
    for i in range(len(tables["t"])):
        k = {n: v[i] for n, v in tables.items()}
        x, state = step(predict, x, state, k, None if noise is None else noise[i], prediction_type=prediction_type)
    return x


def rel_err(got, want):
    return np.abs(got - want).max() / np.abs(want).max()


def diffusers_run(scheduler, x, model, output="prev_sample"):
    """diffusers' pipeline loop: one model call per entry of scheduler.timesteps; the result is the
    last step's prev_sample (PNDM) or denoised (LCM's pipeline)."""
    x = torch.from_numpy(x)
    for t in scheduler.timesteps:
        out = scheduler.step(model(x, float(t)), t, x)
        x = out.prev_sample
    return getattr(out, output).numpy()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [1, 3, 10, 20, 50])  # 1, 3: warm-up cut short
def test_plms_matches_diffusers_pndm(num_steps, prediction_type, rng):
    ref = diffusers.PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type=prediction_type)
    ref.set_timesteps(num_steps)
    tables = plms_tables(NoiseSchedule.from_name("scaled_linear"), num_steps)
    np.testing.assert_array_equal(tables["t"], ref.timesteps.numpy())  # N + 1 model calls, t_1 twice
    x_T = rng.standard_normal(SHAPE)
    got = run(plms_init, plms_step, tables, fake_model(np.tanh), x_T, None, prediction_type)
    want = diffusers_run(ref, x_T, fake_model(torch.tanh))
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("num_steps", [2, 4, 8])
def test_lcm_matches_diffusers(num_steps, prediction_type, rng, monkeypatch):
    ref = diffusers.LCMScheduler(**SD, prediction_type=prediction_type)
    ref.set_timesteps(num_steps)
    tables = lcm_tables(NoiseSchedule.from_name("scaled_linear"), num_steps)
    np.testing.assert_array_equal(tables["t"], ref.timesteps.numpy())
    x_T = rng.standard_normal(SHAPE)
    noise = rng.standard_normal((num_steps,) + SHAPE)
    drawn = []  # diffusers draws in steps 0 .. N-2: hand it the same noise[i] as ours

    def randn_tensor(shape, **kw):
        drawn.append(len(drawn))
        return torch.from_numpy(noise[drawn[-1]]).to(kw.get("dtype"))

    monkeypatch.setattr(diffusers.schedulers.scheduling_lcm, "randn_tensor", randn_tensor)
    got = run(lcm_init, lcm_step, tables, fake_model(np.tanh), x_T, noise, prediction_type)
    want = diffusers_run(ref, x_T, fake_model(torch.tanh), output="denoised")
    assert len(drawn) == num_steps - 1
    assert rel_err(got, want) <= TOL


SAMPLERS = {"plms": (plms_init, plms_step, plms_tables, 20), "lcm": (lcm_init, lcm_step, lcm_tables, 4)}


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_steps_under_jit_and_scan_match_numpy(name, prediction_type, rng):
    """Float32 tables and arrays in one jitted jax.lax.scan vs the float64 NumPy loop."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    init, step, make_tables, num_steps = SAMPLERS[name]
    tables = make_tables(NoiseSchedule.from_name("scaled_linear"), num_steps)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((len(tables["t"]),) + SHAPE).astype(np.float32)
    predict = fake_model(jnp.tanh)

    def body(carry, row):
        k, z = row
        return step(predict, *carry, k, z, prediction_type=prediction_type), None

    @jax.jit
    def sample(x, tables, noise):
        return jax.lax.scan(body, (x, init(x)), (tables, noise))[0][0]

    got = np.asarray(sample(x_T, {n: jnp.asarray(v, jnp.float32) for n, v in tables.items()}, noise))
    want = run(init, step, tables, fake_model(np.tanh), x_T.astype(np.float64), noise.astype(np.float64), prediction_type)
    assert rel_err(got, want) <= TOL
