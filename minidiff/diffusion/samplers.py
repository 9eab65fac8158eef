"""Reverse samplers: DDPM (ancestral) and DDIM (eta), DDIM inversion, and the timestep grids.

A sampler walks an *inference schedule*: N timesteps t_0 > t_1 > ... > t_{N-1}, and for each one
the pair (alpha_bar_t, alpha_bar_prev) it jumps between.  The step functions are plain
arithmetic on arrays and scalars, so the same function runs on NumPy arrays in a lesson and on
traced JAX arrays inside ``jax.jit`` / ``jax.lax.scan`` in the Stable Diffusion pipeline.
The caller supplies the Gaussian noise, so sampling is reproducible from a seed.

The model predicts one of three things about x_t (``prediction_type``):
    "epsilon"       eps, the noise that was added              x_t = sqrt(ab) x0 + sqrt(1-ab) eps
    "sample"        x0 itself
    "v_prediction"  v = sqrt(ab) eps - sqrt(1-ab) x0           (Salimans & Ho; SD 2.x 768-v)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import check_shapes, expand_like
from .forward import q_posterior
from .schedule import NoiseSchedule, posterior_coefficients

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCES = ("beta_tilde", "beta")

# ---------------------------------------------------------------------------------------------
# Conversions between eps, x0 and v (ab = alpha_bar_t)
# ---------------------------------------------------------------------------------------------


def x0_from_eps(x_t, eps, alpha_bar_t):
    """x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)."""
    ab = expand_like(alpha_bar_t, x_t)
    return (x_t - (1 - ab) ** 0.5 * eps) / ab**0.5


def eps_from_x0(x_t, x0, alpha_bar_t):
    """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    ab = expand_like(alpha_bar_t, x_t)
    return (x_t - ab**0.5 * x0) / (1 - ab) ** 0.5


def velocity(x0, eps, alpha_bar_t):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0, the v-prediction training target."""
    ab = expand_like(alpha_bar_t, x0)
    return ab**0.5 * eps - (1 - ab) ** 0.5 * x0


def x0_eps_from_v(x_t, v, alpha_bar_t):
    """Invert v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v,  eps = sqrt(ab) v + sqrt(1 - ab) x_t."""
    ab = expand_like(alpha_bar_t, x_t)
    return ab**0.5 * x_t - (1 - ab) ** 0.5 * v, ab**0.5 * v + (1 - ab) ** 0.5 * x_t


def split_prediction(model_output, x_t, alpha_bar_t, prediction_type: str = "epsilon"):
    """Turn a model output of the given type into the pair (x0_hat, eps_hat)."""
    check_shapes(model_output=model_output, x_t=x_t)
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar_t), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, alpha_bar_t)
    if prediction_type == "v_prediction":
        return x0_eps_from_v(x_t, model_output, alpha_bar_t)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Inference timesteps
# ---------------------------------------------------------------------------------------------


def inference_timesteps(
    num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The N timesteps a sampler visits, in decreasing order (int64).

    - ``leading``  (SD, with steps_offset=1): t = arange(N) * (T // N) + offset, reversed
      (steps_offset applies to this spacing only, as in diffusers)
    - ``trailing`` t = round(arange(T, 0, -T/N)) - 1 : always starts at T-1
    - ``linspace`` t = round(linspace(0, T-1, N)), reversed
    """
    T, N = num_train_timesteps, num_inference_steps
    if not isinstance(N, (int, np.integer)) or not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must be an integer in [1, {T}] (the training steps), got {N!r}")
    if spacing == "leading":
        t = np.arange(N, dtype=np.int64)[::-1] * (T // N) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if t.max() >= T or t.min() < 0:
        raise ValueError(
            f"steps_offset={steps_offset} moves the timesteps {t.min()}..{t.max()} outside [0, {T - 1}] "
            f"for {N} steps with {spacing!r} spacing"
        )
    return t.copy()


@dataclass(frozen=True)
class InferenceSchedule:
    """The N steps of a sampler: step i jumps from ``alpha_bar_t[i]`` (timestep ``timesteps[i]``) to
    ``alpha_bar_prev[i]``, the alpha_bar of the next timestep.  The last step jumps to 1 (a clean
    sample) when ``set_alpha_to_one``, else to alpha_bar[0] (SD's DDIM setting)."""

    timesteps: np.ndarray  # (N,) int64, decreasing
    alpha_bar_t: np.ndarray  # (N,) float64
    alpha_bar_prev: np.ndarray  # (N,) float64

    @classmethod
    def create(
        cls,
        schedule: NoiseSchedule,
        num_inference_steps: int,
        spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
    ) -> "InferenceSchedule":
        t = inference_timesteps(num_inference_steps, len(schedule), spacing, steps_offset)
        final = 1.0 if set_alpha_to_one else schedule.alpha_bar[0]
        alpha_bar_t = schedule.alpha_bar[t]
        alpha_bar_prev = np.append(alpha_bar_t[1:], final)
        return cls(t, alpha_bar_t, alpha_bar_prev)

    @classmethod
    def stable_diffusion(cls, num_inference_steps: int = 50) -> "InferenceSchedule":
        """SD 1.x/2.x: scaled_linear betas, leading spacing, steps_offset=1, set_alpha_to_one=False."""
        sched = NoiseSchedule.from_name("scaled_linear")
        return cls.create(sched, num_inference_steps, "leading", steps_offset=1, set_alpha_to_one=False)

    def __len__(self) -> int:
        return len(self.timesteps)


# ---------------------------------------------------------------------------------------------
# One reverse step
# ---------------------------------------------------------------------------------------------


def _x0_eps(model_output, x_t, alpha_bar_t, prediction_type, clip_x0):
    x0, eps = split_prediction(model_output, x_t, alpha_bar_t, prediction_type)
    if clip_x0 is not None:  # optional for pixel-space models: keep x0_hat in [-c, c]
        x0 = x0.clip(-clip_x0, clip_x0)
    return x0, eps


def ddpm_step(
    x_t,
    model_output,
    alpha_bar_t,
    alpha_bar_prev,
    noise,
    variance: str = "beta_tilde",
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
):
    """Ancestral DDPM step x_t -> x_prev ~ p(x_prev | x_t) = N(mu_tilde(x_t, x0_hat), sigma^2 I).

        x0_hat  from the model output
        mu      = mu_tilde(x_t, x0_hat)           posterior mean of q(x_prev | x_t, x0)
        sigma^2 = beta_tilde  ("beta_tilde", diffusers' fixed_small)
                  or beta     ("beta", fixed_large), beta = 1 - alpha_bar_t / alpha_bar_prev,
                  0 on the last step to alpha_bar_prev = 1 either way
        x_prev  = mu + sigma * z,   z ~ N(0, I) given as ``noise``

    Returns (x_prev, x0_hat).
    """
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(DDPM_VARIANCES)}")
    check_shapes(x_t=x_t, model_output=model_output, noise=noise)
    x0, _ = _x0_eps(model_output, x_t, alpha_bar_t, prediction_type, clip_x0)
    mean, var = q_posterior(x0, x_t, alpha_bar_t, alpha_bar_prev)
    if variance == "beta":
        # beta = 1 - alpha_bar_t / alpha_bar_prev; the step to a clean sample (alpha_bar_prev = 1)
        # adds no noise (DDPM Algorithm 2: z = 0 at t = 1); beta_tilde is 0 there by itself.
        var = expand_like((1 - alpha_bar_t / alpha_bar_prev) * (alpha_bar_prev < 1), x_t)
    return mean + var**0.5 * noise, x0


def ddim_sigma(alpha_bar_t, alpha_bar_prev, eta):
    """DDIM's sigma_t (Song et al. eq. 16): eta * sqrt(beta_tilde).  eta=1 gives DDPM's variance."""
    if isinstance(eta, (int, float)) and eta == 0:
        return 0.0  # deterministic; also defined where beta_tilde is not (alpha_bar_t = 1, inversion)
    return eta * posterior_coefficients(alpha_bar_t, alpha_bar_prev)[2] ** 0.5


def ddim_step(
    x_t,
    model_output,
    alpha_bar_t,
    alpha_bar_prev,
    eta: float = 0.0,
    noise=None,
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
):
    """DDIM step (Song et al. eq. 12):

        x_prev = sqrt(alpha_bar_prev) x0_hat                       "predicted x0"
               + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat        "direction pointing to x_t"
               + sigma z                                           random noise, sigma = eta sqrt(beta_tilde)

    eta = 0 is deterministic (``noise`` may be None); eta = 1 has DDPM's variance.
    With alpha_bar_prev < alpha_bar_t the same formula runs the deterministic chain upwards
    (DDIM inversion).  Returns (x_prev, x0_hat).
    """
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim_step with eta != 0 needs the Gaussian noise z passed as noise=")
    check_shapes(x_t=x_t, model_output=model_output, noise=noise)
    x0, eps = _x0_eps(model_output, x_t, alpha_bar_t, prediction_type, clip_x0)
    sigma = expand_like(ddim_sigma(alpha_bar_t, alpha_bar_prev, eta), x_t)
    ab_prev = expand_like(alpha_bar_prev, x_t)
    x_prev = ab_prev**0.5 * x0 + (1 - ab_prev - sigma**2) ** 0.5 * eps
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


# ---------------------------------------------------------------------------------------------
# Whole loops (NumPy; the SD pipeline runs the same steps in a jax.lax loop)
# ---------------------------------------------------------------------------------------------


def sample(
    model_fn,
    x_T,
    schedule: InferenceSchedule,
    sampler: str = "ddim",
    eta: float = 0.0,
    rng: np.random.Generator | None = None,
    prediction_type: str = "epsilon",
    clip_x0: float | None = None,
    variance: str = "beta_tilde",
    return_trajectory: bool = False,
    progress: bool = False,
):
    """Run the reverse chain from x_T.  ``model_fn(x_t, t)`` returns the model output for the
    integer timestep t.  ``sampler`` is "ddpm" or "ddim"; both draw their noise from ``rng``.
    Returns x0, or (x0, [x_T, ..., x0]) with ``return_trajectory``."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
    needs_noise = sampler == "ddpm" or eta != 0
    if needs_noise and rng is None:
        raise ValueError(f"the {sampler} sampler with eta={eta} draws noise: pass rng=np.random.default_rng(seed)")
    x = np.asarray(x_T)
    trajectory = [x]
    steps = zip(schedule.timesteps, schedule.alpha_bar_t, schedule.alpha_bar_prev)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(list(steps), desc=sampler)
    for t, ab_t, ab_prev in steps:
        out = model_fn(x, int(t))
        z = rng.standard_normal(x.shape) if needs_noise else None
        if sampler == "ddpm":
            x, _ = ddpm_step(x, out, ab_t, ab_prev, z, variance, prediction_type, clip_x0)
        else:
            x, _ = ddim_step(x, out, ab_t, ab_prev, eta, z, prediction_type, clip_x0)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def ddim_invert(model_fn, x0, schedule: InferenceSchedule, prediction_type: str = "epsilon", return_trajectory=False):
    """Deterministic DDIM inversion x0 -> x_T: the eta=0 step run upwards, from alpha_bar_prev[i]
    to alpha_bar_t[i], visiting the schedule's timesteps in increasing order.  The model is
    evaluated at (x, t_i) with x still at the lower noise level: the usual approximation
    eps(x_{t_prev}, t) ~ eps(x_t, t), exact as the steps get small."""
    x = np.asarray(x0)
    trajectory = [x]
    for t, ab_t, ab_prev in zip(schedule.timesteps[::-1], schedule.alpha_bar_t[::-1], schedule.alpha_bar_prev[::-1]):
        x, _ = ddim_step(x, model_fn(x, int(t)), ab_prev, ab_t, 0.0, None, prediction_type)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x
