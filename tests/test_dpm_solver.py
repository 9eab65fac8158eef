"""DPM-Solver++(2M), SDE-DPM-Solver++(2M) and UniPC against diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler: whole trajectories under a deterministic fake model.

Both sides start from the same latents, see the same per-step noise (diffusers' ``variance_noise``)
and evaluate the same smooth model eps/v(x, t) = 0.5 tanh(x) + 1e-3 t.  minidiff runs in float64 on
its own float64 schedule; diffusers in float64 samples with float32 sigmas (and a float32 alpha_bar
cumprod, ~4e-7 relative from ours).  The final samples must agree to max |ours - theirs| / max |theirs|
<= 1e-5 (measured <= 4e-6, worst for the SDE with v-prediction on Karras sigmas); dropping the
second-order term or the UniPC corrector moves them by >= 3e-4.

Exponential grids are not compared: diffusers casts their fractional timesteps to int64 (truncating;
999 becomes 998 through its float32 sigmas), minidiff's model sees the interpolated t.
"""

import numpy as np
import pytest

from minidiff.diffusion import NoiseSchedule
from minidiff.diffusion import dpm_solver as ds

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")


def _fake_model(x, t):
    tanh = torch.tanh if isinstance(x, torch.Tensor) else np.tanh
    return 0.5 * tanh(x) + 1e-3 * t


def _inputs(num_steps, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32).astype(np.float64)  # noqa: E731
    return draw(*SHAPE), draw(num_steps, *SHAPE)


def _diffusers(sampler, num_steps, sigmas, prediction_type, spacing, final, x, noise):
    kw = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, final_sigmas_type=final,
              use_karras_sigmas=sigmas == "karras", use_exponential_sigmas=sigmas == "exponential")
    if sampler == "unipc":
        sched = diffusers.UniPCMultistepScheduler(**kw)
    else:
        algorithm = "sde-dpmsolver++" if sampler == "dpmpp_2m_sde" else "dpmsolver++"
        sched = diffusers.DPMSolverMultistepScheduler(algorithm_type=algorithm, **kw)
    sched.set_timesteps(num_steps)
    xt = torch.from_numpy(x)
    for i, t in enumerate(sched.timesteps):
        extra = dict(variance_noise=torch.from_numpy(noise[i])) if sampler == "dpmpp_2m_sde" else {}
        xt = sched.step(_fake_model(xt, float(t)), t, xt, **extra).prev_sample
    return sched, xt.numpy()


def _minidiff(sampler, tables, x, noise, prediction_type, predict=_fake_model):
    init, step = getattr(ds, sampler + "_init"), getattr(ds, sampler + "_step")
    state = init(x)
    for i in range(len(tables["t"])):
        k = {n: v[i] for n, v in tables.items()}
        x, state = step(predict, x, state, k, noise[i], prediction_type=prediction_type)
    return x


CASES = [(s, n, sig, pt, "linspace", "zero") for s in SAMPLERS for n in (10, 20, 50)
         for sig in ("default", "karras") for pt in ("epsilon", "v_prediction")]
CASES += [(s, 20, "default", "epsilon", "trailing", "zero") for s in SAMPLERS]
CASES += [(s, 20, "default", "epsilon", "leading", "sigma_min") for s in SAMPLERS]


@pytest.mark.parametrize("sampler,num_steps,sigmas,prediction_type,spacing,final", CASES)
def test_trajectory_matches_diffusers(sampler, num_steps, sigmas, prediction_type, spacing, final):
    x, noise = _inputs(num_steps)
    ref_sched, ref = _diffusers(sampler, num_steps, sigmas, prediction_type, spacing, final, x, noise)
    grid = getattr(ds, sampler + "_grid")(NoiseSchedule.from_name("scaled_linear"), num_steps, sigmas, spacing,
                                          steps_offset=1, final=final)
    np.testing.assert_array_equal(grid.timesteps, ref_sched.timesteps.numpy())
    # Karras / exponential grids inherit diffusers' float32 sigma_min and sigma_max (~1e-5 relative)
    np.testing.assert_allclose(grid.sigmas, ref_sched.sigmas.double().numpy(), rtol=2e-5, atol=0)
    tables = getattr(ds, sampler + "_tables")(grid)
    assert set(tables) >= {"t"} and all(v.shape == (num_steps,) for v in tables.values())
    out = _minidiff(sampler, tables, x, noise, prediction_type)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= TOL, f"{sampler} {num_steps} steps {sigmas} {prediction_type}: relative error {err:.2e}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_steps_run_under_jax_scan(sampler):
    """The step functions are plain arithmetic: jax.jit + lax.scan over the tables (float32) gives the
    NumPy float64 trajectory to 1e-5."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    num_steps, pt = 20, "v_prediction"
    x, noise = _inputs(num_steps, seed=1)
    tables = getattr(ds, sampler + "_tables")(ds.multistep_grid(NoiseSchedule.from_name("scaled_linear"), num_steps,
                                                                "karras"))
    ref = _minidiff(sampler, tables, x, noise, pt)
    init, step = getattr(ds, sampler + "_init"), getattr(ds, sampler + "_step")

    @jax.jit
    def run(x, tables, noise):
        def body(carry, k_z):
            k, z = k_z
            x, state = step(lambda x, t: 0.5 * jnp.tanh(x) + 1e-3 * t, *carry, k, z, prediction_type=pt)
            return (x, state), None

        (x, _), _ = jax.lax.scan(body, (x, init(x)), (tables, noise))
        return x

    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = np.asarray(run(f32(x), {n: f32(v) for n, v in tables.items()}, f32(noise)), np.float64)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= TOL, f"{sampler} under jax.lax.scan: relative error {err:.2e}"


def test_lower_order_steps_and_unipc_corrector_tables():
    """First and last steps are first order (coefficient 0); UniPC's corrector is the identity on row 0,
    trapezoidal (rho_t = 1/2) on row 1, and UniP-2 shares DPM-Solver++(2M)'s tables."""
    grid = ds.multistep_grid(NoiseSchedule.from_name("scaled_linear"), 10)
    dpm, uni = ds.dpmpp_2m_tables(grid), ds.unipc_tables(grid)
    assert dpm["half_over_r"][0] == dpm["half_over_r"][-1] == 0 and np.all(dpm["half_over_r"][1:-1] > 0)
    for name in ("t", "ab", "sigma_ratio", "alpha", "exp_neg_h", "half_over_r"):
        np.testing.assert_array_equal(uni[name], dpm[name])
    assert uni["keep"].tolist() == [1] + [0] * 9 and uni["c_alpha"][0] == uni["c_sigma_ratio"][0] == 0
    assert uni["c_rho_t"][1] == 0.5 and uni["c_rho1_over_r"][1] == 0
    # a 20-step grid keeps DPM-Solver++'s last step second order when it stops at sigma_min (N >= 15)
    grid = ds.multistep_grid(NoiseSchedule.from_name("scaled_linear"), 20, final="sigma_min")
    assert ds.dpmpp_2m_tables(grid)["half_over_r"][-1] > 0 and ds.unipc_tables(grid)["half_over_r"][-1] == 0
