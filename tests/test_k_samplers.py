"""Euler, Euler ancestral, Heun and LMS (minidiff.diffusion.k_samplers) against diffusers' schedulers:
whole trajectories driven by one deterministic fake model, same latents, same per-step noise."""

import numpy as np
import pytest

from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_step
from minidiff.diffusion import k_samplers as ks
from minidiff.diffusion.sigmas import alpha_bar_from_sigma, sigma_grid, to_sigma_space

TOL = 1e-5  # max |ours - theirs| / max |theirs| over the whole trajectory (VP space)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
SCHEDULE = NoiseSchedule.from_name("scaled_linear")
SHAPE = (2, 4, 8, 8)
REFERENCE = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}
quiet = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy 2 notes from inside diffusers


def fake_model(tanh):
    """A fixed smooth function of (x_t, t) standing in for the UNet; ``tanh`` from NumPy, torch or JAX."""
    return lambda x, t: 0.5 * tanh(x) + 1e-3 * t


model = fake_model(np.tanh)


def run_ours(name, grid, x, noise, prediction_type, **options):
    tables_fn, init, step = (getattr(ks, f"{name}_{part}") for part in ("tables", "init", "step"))
    tables = tables_fn(grid, **options)
    assert all(v.shape == (len(grid),) for v in tables.values())
    state, trajectory = init(x), []
    for i in range(len(grid)):
        k = {n: v[i] for n, v in tables.items()}
        x, state = step(model, x, state, k, noise[i], prediction_type=prediction_type)
        trajectory.append(x)
    return np.stack(trajectory)


def run_diffusers(name, grid, x_T, noise, prediction_type, sigmas, monkeypatch, **config):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ancestral_module

    model = fake_model(torch.tanh)
    config = dict(SD, timestep_spacing="leading", prediction_type=prediction_type) | config
    if name == "euler_ancestral":  # has no Karras option: drive its step on Euler's Karras grid
        ref = getattr(diffusers, REFERENCE[name])(**config)
        ref.set_timesteps(len(grid))
        if sigmas == "karras":
            euler = diffusers.EulerDiscreteScheduler(**config, use_karras_sigmas=True)
            euler.set_timesteps(len(grid))
            ref.sigmas, ref.timesteps = euler.sigmas, euler.timesteps
        draws = iter(torch.from_numpy(z).float() for z in noise)
        monkeypatch.setattr(ancestral_module, "randn_tensor", lambda *a, **kw: next(draws))
    else:
        ref = getattr(diffusers, REFERENCE[name])(**config, use_karras_sigmas=sigmas == "karras")
        ref.set_timesteps(len(grid))
    # our grid is theirs (Heun's repeats each inner sigma and timestep: s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0)
    pick = np.r_[0, 1 : 2 * len(grid) - 1 : 2] if name == "heun" else np.arange(len(grid))
    np.testing.assert_allclose(ref.timesteps.numpy()[pick], grid.timesteps, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(ref.sigmas.numpy()[np.r_[pick, -1]], grid.sigmas, rtol=2e-5)

    sample = torch.from_numpy(to_sigma_space(x_T, grid.sigmas[0])).float()  # x_T / sqrt(ab) = x0 + sigma eps
    after = []
    for t in ref.timesteps:
        out = model(ref.scale_model_input(sample, t), t)
        sample = ref.step(out, t, sample).prev_sample
        after.append(sample.double().numpy())
    after = np.stack(after)[np.r_[pick[1:], len(after) - 1]] if name == "heun" else np.stack(after)
    return after / (1 + grid.sigmas[1:, None, None, None, None] ** 2) ** 0.5  # back to the VP space


def compare(name, num_steps, sigmas, prediction_type, monkeypatch, spacing="leading", steps_offset=1):
    grid = ks.euler_grid(SCHEDULE, num_steps, sigmas, spacing, steps_offset)
    rng = np.random.default_rng(num_steps)
    x_T = rng.standard_normal(SHAPE)
    noise = rng.standard_normal((num_steps,) + SHAPE) if name == "euler_ancestral" else [None] * num_steps
    ours = run_ours(name, grid, x_T, noise, prediction_type)
    theirs = run_diffusers(name, grid, x_T, noise, prediction_type, sigmas, monkeypatch,
                           timestep_spacing=spacing, steps_offset=steps_offset)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= TOL, f"{name} {num_steps} steps {sigmas} {prediction_type} {spacing}: relative error {err:.2e}"
    return err


@pytest.mark.parity
@quiet
@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("num_steps", [10, 20, 50])
@pytest.mark.parametrize("sigmas", ["default", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_on_sd_schedule(name, num_steps, sigmas, prediction_type, monkeypatch):
    compare(name, num_steps, sigmas, prediction_type, monkeypatch)


@pytest.mark.parity
@quiet
@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_matches_diffusers_with_other_spacings(name, spacing, monkeypatch):
    """The "linspace" spacing keeps diffusers' unrounded timesteps t = linspace(0, 999, N) (euler_grid)."""
    compare(name, 20, "default", "v_prediction" if spacing == "trailing" else "epsilon", monkeypatch, spacing, 0)


@pytest.mark.parametrize("final, set_alpha_to_one", [("sigma_min", False), ("zero", True)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_is_euler_in_the_sigma_view(final, set_alpha_to_one, prediction_type):
    """DDIM (eta = 0) divided by sqrt(ab_prev):  x_prev / sqrt(ab_prev) = x0_hat + sigma_prev eps_hat
    = x / sqrt(ab) + (sigma_prev - sigma) eps_hat, an Euler step.  Same trajectory when the grids
    agree, the final one included: SD's set_alpha_to_one=False (last alpha_bar = alpha_bar[0]) is the
    grid ending at final="sigma_min" = sigma(alpha_bar[0]); set_alpha_to_one=True is final="zero"."""
    isc = InferenceSchedule.create(SCHEDULE, 20, "leading", 1, set_alpha_to_one)
    grid = sigma_grid(SCHEDULE, 20, spacing="leading", steps_offset=1, final=final)
    np.testing.assert_allclose(alpha_bar_from_sigma(grid.sigmas), np.append(isc.alpha_bar_t, isc.alpha_bar_prev[-1]),
                               rtol=1e-12)
    x = np.random.default_rng(1).standard_normal(SHAPE)
    ddim = []
    for t, ab_t, ab_prev in zip(isc.timesteps, isc.alpha_bar_t, isc.alpha_bar_prev):
        ddim.append(ddim_step(ddim[-1] if ddim else x, model(ddim[-1] if ddim else x, t), ab_t, ab_prev,
                              prediction_type=prediction_type)[0])
    euler = run_ours("euler", grid, x, [None] * 20, prediction_type)
    assert np.abs(euler - np.stack(ddim)).max() <= 1e-6 * np.abs(ddim).max()


def test_ancestral_with_eta_zero_is_euler():
    grid = ks.euler_grid(SCHEDULE, 10, "karras", steps_offset=1)
    rng = np.random.default_rng(2)
    x, noise = rng.standard_normal(SHAPE), rng.standard_normal((10,) + SHAPE)
    np.testing.assert_allclose(run_ours("euler_ancestral", grid, x, noise, "epsilon", eta=0.0),
                               run_ours("euler", grid, x, noise, "epsilon"), rtol=1e-12, atol=1e-12)


def test_lms_coefficients_integrate_polynomials_exactly():
    """The Lagrange basis sums to 1, so the coefficients sum to sigma_{i+1} - sigma_i; and a slope
    that is a cubic in sigma is integrated exactly once four slopes are known."""
    s = ks.euler_grid(SCHEDULE, 12, "karras", steps_offset=1).sigmas
    c = ks.lms_coefficients(s)
    np.testing.assert_allclose(c.sum(axis=1), np.diff(s), rtol=1e-12)
    p = np.polynomial.Polynomial([0.3, -1.0, 0.2, 0.05])
    for i in range(3, len(s) - 1):
        exact = p.integ()(s[i + 1]) - p.integ()(s[i])
        np.testing.assert_allclose(sum(c[i, j] * p(s[i - j]) for j in range(4)), exact, rtol=1e-9)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_a_jitted_scan_matches_the_numpy_loop(name):
    """The steps are plain arithmetic: the same functions run inside jax.jit / jax.lax.scan."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    tables_fn, init, step = (getattr(ks, f"{name}_{part}") for part in ("tables", "init", "step"))
    grid = ks.euler_grid(SCHEDULE, 20, "karras", steps_offset=1)
    tables = tables_fn(grid)
    rng = np.random.default_rng(3)
    x_T, noise = rng.standard_normal(SHAPE), rng.standard_normal((20,) + SHAPE)

    @jax.jit
    def run(x, tables, noise):
        def body(carry, row):
            x, state = step(fake_model(jnp.tanh), *carry, row[0], row[1], prediction_type="v_prediction")
            return (x, state), x

        return jax.lax.scan(body, (x, init(x)), (tables, noise))[1]

    as_f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.asarray(run(as_f32(x_T), {n: as_f32(v) for n, v in tables.items()}, as_f32(noise)))
    want = run_ours(name, grid, x_T, noise, "v_prediction")
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
