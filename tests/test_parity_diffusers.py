"""Parity with diffusers' DDPMScheduler and DDIMScheduler: same timesteps, same step outputs.

Every step is fed the same random x_t, model output and noise on both sides; the outputs
(x_prev and the predicted x0) must agree to max abs error <= 1e-5.

Precision.  diffusers builds alpha_bar with a float32 cumprod; minidiff in float64, as the
original ldm code did.  The two tables differ by up to ~1e-6 relative (checked below), which
x0_hat = x_t / sqrt(alpha_bar_t) amplifies to ~2e-5 absolute where |x0_hat| ~ 30 (SD, t = 981).
So the step formulas are compared by feeding minidiff's step diffusers' own alpha_bar values,
with float64 inputs: max abs error <= 1e-5 (measured <= 7e-6; diffusers takes sqrt(alpha_bar)
of a float32 scalar even for float64 inputs).  Float32 inputs are not compared with diffusers:
its float32 step is itself off the exact result by up to 3e-4 (at t = 2 of the linear schedule,
from cancellation in 1 - alpha_bar_t / alpha_bar_prev), while minidiff computes coefficients in
double precision (see test_samplers.py::test_float32_steps_stay_float32_and_accurate).
"""

import numpy as np
import pytest

from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_step, ddpm_step, inference_timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.parity

TOL = 1e-5

# name -> (diffusers config, minidiff schedule name + beta range, steps_offset, set_alpha_to_one, clip)
CONFIGS = {
    # Stable Diffusion 1.x scheduler config (scheduler/scheduler_config.json)
    "sd": dict(
        diffusers=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                       set_alpha_to_one=False, clip_sample=False),
        schedule=("scaled_linear", 0.00085, 0.012), steps_offset=1, set_alpha_to_one=False, clip=None,
    ),
    # diffusers' defaults: DDPM's linear schedule, x0 clipped to [-1, 1]
    "defaults": dict(
        diffusers=dict(), schedule=("linear", 1e-4, 0.02), steps_offset=0, set_alpha_to_one=True, clip=1.0,
    ),
}


def _ours(cfg, num_steps, **kw):
    name, lo, hi = cfg["schedule"]
    sched = NoiseSchedule.from_name(name, beta_start=lo, beta_end=hi)
    return sched, InferenceSchedule.create(
        sched, num_steps, kw.get("spacing", "leading"), cfg["steps_offset"], kw.get("set_alpha_to_one", cfg["set_alpha_to_one"])
    )


def _inputs(rng, shape=(2, 4, 8, 8)):
    return [rng.standard_normal(shape) for _ in range(3)]


def _with_alpha_bar(isc, alpha_bar, final):
    """The same steps, with alpha_bar values taken from another table (diffusers')."""
    ab_t = alpha_bar[isc.timesteps]
    return InferenceSchedule(isc.timesteps, ab_t, np.append(ab_t[1:], final))


def _err(ours, theirs):
    return np.abs(ours - theirs.numpy()).max()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("num_steps", [50, 7])
def test_ddim_matches_diffusers(config, prediction_type, eta, num_steps):
    cfg = CONFIGS[config]
    ref = diffusers.DDIMScheduler(prediction_type=prediction_type, **cfg["diffusers"])
    ref.set_timesteps(num_steps)
    sched, isc = _ours(cfg, num_steps)
    np.testing.assert_array_equal(isc.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(sched.alpha_bar, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=0)  # float32 cumprod drift

    ref_isc = _with_alpha_bar(isc, ref.alphas_cumprod.double().numpy(), float(ref.final_alpha_cumprod))
    rng = np.random.default_rng(0)
    worst = 0.0
    for i, t in enumerate(isc.timesteps):
        x, out, z = _inputs(rng)
        r = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x), eta=eta,
                     variance_noise=torch.from_numpy(z) if eta else None)
        x_prev, x0 = ddim_step(x, out, ref_isc.alpha_bar_t[i], ref_isc.alpha_bar_prev[i], eta, z if eta else None,
                               prediction_type, cfg["clip"])
        worst = max(worst, _err(x_prev, r.prev_sample), _err(x0, r.pred_original_sample))
    assert worst <= TOL, f"max abs error {worst:.2e}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("num_steps", [50, 1000])
def test_ddpm_matches_diffusers(config, prediction_type, variance, num_steps):
    cfg = CONFIGS[config]
    if num_steps + cfg["steps_offset"] > 1000:
        num_steps -= cfg["steps_offset"]  # 1000 steps + offset 1 would leave the training range
    variance_type = {"beta_tilde": "fixed_small", "beta": "fixed_large"}[variance]
    dcfg = {k: v for k, v in cfg["diffusers"].items() if k != "set_alpha_to_one"}
    ref = diffusers.DDPMScheduler(prediction_type=prediction_type, variance_type=variance_type, **dcfg)
    ref.set_timesteps(num_steps)
    # diffusers' DDPM always ends on alpha_bar = 1
    sched, isc = _ours(cfg, num_steps, set_alpha_to_one=True)
    np.testing.assert_array_equal(isc.timesteps, ref.timesteps.numpy())

    ref_isc = _with_alpha_bar(isc, ref.alphas_cumprod.double().numpy(), 1.0)
    rng = np.random.default_rng(1)
    worst = 0.0
    steps = range(len(isc)) if num_steps <= 50 else [0, 1, 2, *rng.choice(len(isc), 40, replace=False), len(isc) - 1]
    for i in steps:
        t = int(isc.timesteps[i])
        x, out, _ = _inputs(rng)
        gen = torch.Generator().manual_seed(int(i))
        # the noise diffusers draws inside step(), drawn again from the same seed
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(i)), dtype=torch.float64).numpy()
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=gen)
        x_prev, x0 = ddpm_step(x, out, ref_isc.alpha_bar_t[i], ref_isc.alpha_bar_prev[i], z, variance, prediction_type,
                               cfg["clip"])
        expected = r.prev_sample
        if variance == "beta" and i == len(isc) - 1 and t > 0:
            # Documented difference: diffusers' fixed_large adds noise on the last step whenever
            # t > 0 (here t = steps_offset = 1); minidiff follows DDPM's Algorithm 2 (z = 0 on
            # the step to the clean sample).  Compare against diffusers' output minus that noise.
            expected = expected - (1 - ref.alphas_cumprod[t].double()) ** 0.5 * torch.from_numpy(z)
        worst = max(worst, _err(x_prev, expected), _err(x0, r.pred_original_sample))
    assert worst <= TOL, f"max abs error {worst:.2e}"


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 10, 25, 50, 333, 999])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(spacing, num_steps, steps_offset):
    ref = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = inference_timesteps(num_steps, 1000, spacing, steps_offset)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("name,dname", [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(name, dname):
    kw = {} if name == "cosine" else dict(zip(("beta_start", "beta_end"), {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[name]))
    ref = diffusers.DDPMScheduler(beta_schedule=dname, **kw)
    np.testing.assert_allclose(NoiseSchedule.from_name(name).betas, ref.betas.numpy(), rtol=1e-6, atol=1e-9)
