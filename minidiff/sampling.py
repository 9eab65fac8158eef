"""The reverse chain for JAX models, compiled once.

:func:`reverse_chain` is ``minidiff.diffusion.sample``'s walk over an :class:`InferenceSchedule` as one
``jax.lax.scan`` inside one ``jax.jit``, calling the same step functions (``ddim_step``, ``ddpm_step``)
with coefficients gathered from the schedule's arrays.  All noise comes from one key (:func:`noise_keys`)::

    k_T, k_steps = split(key);   x_T = N(0, I) from k_T;   z_i = N(0, I) from split(k_steps, N)[i]

so a sample is a pure function of (params, key).  :func:`guided_output` is classifier-free guidance,
both halves in one doubled batch: eps = eps(x_t, uncond) + s (eps(x_t, cond) - eps(x_t, uncond)).
:class:`Sampler` wraps the two for a model; ``minidiff.pipeline`` calls them directly.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from .diffusion import InferenceSchedule, ddim_step, ddpm_step
from .diffusion.samplers import DDPM_VARIANCES, PREDICTION_TYPES

ModelFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]  # (params, x_t, t (B,), cond) -> output


def noise_keys(key, num_steps: int):
    """The sampler's whole use of randomness: (key of x_T, the (N,) keys of the steps' noise z_i)."""
    k_T, k_steps = jax.random.split(key)
    return k_T, jax.random.split(k_steps, num_steps)


class Sampler:
    """DDIM or DDPM sampling of a JAX model, compiled once per input shape.

    ``model_fn(params, x_t, t, cond)`` returns the model output (``prediction_type``: "epsilon",
    "sample" or "v_prediction") for the batch x_t at the timesteps t, shape (B,) int32; ``cond`` is
    whatever the model is conditioned on (class labels, text embeddings, or None), a pytree whose
    leaves have the batch as first axis.

        sampler = Sampler(model_fn, InferenceSchedule.create(NoiseSchedule.from_name("linear"), 50))
        x0 = sampler(params, jax.random.key(0), (16, 2))          # compiles
        x0 = sampler(params, jax.random.key(1), (16, 2))          # reuses the program
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: InferenceSchedule,
        sampler: str = "ddim",
        eta: float = 0.0,
        prediction_type: str = "epsilon",
        variance: str = "beta_tilde",
        clip_x0: float | None = None,
    ):
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; choose 'ddpm' or 'ddim'")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if variance not in DDPM_VARIANCES:
            raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(DDPM_VARIANCES)}")
        self.model_fn, self.schedule, self.sampler = model_fn, schedule, sampler
        self.eta, self.prediction_type, self.variance, self.clip_x0 = float(eta), prediction_type, variance, clip_x0
        self._chain = jax.jit(self._run, static_argnames=("shape", "return_trajectory"))

    def __call__(self, params, key, shape=None, *, x_T=None, cond=None, uncond=None, guidance_scale=1.0,
                 return_trajectory: bool = False):
        """Run the chain from x_T (drawn from ``key`` unless given) down to x0.

        Returns x0, or (x0, trajectory) with ``return_trajectory``: the stacked (N + 1, *shape)
        states x_T, ..., x0.
        """
        if (shape is None) == (x_T is None):
            raise ValueError("give exactly one of shape= (x_T is drawn from the key) and x_T=")
        shape = None if shape is None else tuple(int(s) for s in shape)
        return self._chain(params, key, x_T, cond, uncond, jnp.float32(guidance_scale),
                           shape=shape, return_trajectory=return_trajectory)

    def predict(self, params, x, t, cond, uncond, guidance_scale):
        """The model output at one step, guided when ``uncond`` is given."""
        return guided_output(self.model_fn, params, x, t, cond, uncond, guidance_scale)

    def _run(self, params, key, x_T, cond, uncond, guidance_scale, shape, return_trajectory):
        isc = self.schedule
        k_T, step_keys = noise_keys(key, len(isc))
        x = jax.random.normal(k_T, shape, jnp.float32) if x_T is None else jnp.asarray(x_T, jnp.float32)
        steps = (jnp.asarray(isc.timesteps, jnp.int32), jnp.asarray(isc.alpha_bar_t, jnp.float32),
                 jnp.asarray(isc.alpha_bar_prev, jnp.float32), step_keys)
        return reverse_chain(lambda x, t: self.predict(params, x, t, cond, uncond, guidance_scale), x, steps,
                             self.sampler, self.eta, self.prediction_type, self.variance, self.clip_x0,
                             return_trajectory=return_trajectory)


def guided_output(model_fn: ModelFn, params, x, t, cond, uncond=None, guidance_scale=1.0):
    """The model output for the batch x at the (scalar) timestep t; with ``uncond`` given, classifier-free
    guidance: both branches in one doubled batch, mixed as eps_u + s (eps_c - eps_u)."""
    t = jnp.full((x.shape[0],), t)  # int32 on the training timesteps, float32 between them (Karras grids)
    if uncond is None:
        return model_fn(params, x, t, cond)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
    out_c, out_u = jnp.split(model_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2)
    return out_u + guidance_scale * (out_c - out_u)  # eps_u + s (eps_c - eps_u)


def reverse_step(predict, x, step, sampler: str = "ddim", eta: float = 0.0, prediction_type: str = "epsilon",
                 variance: str = "beta_tilde", clip_x0: float | None = None):
    """One step of the chain, x_t -> x_{t-1}: ``step`` = (t, alpha_bar_t, alpha_bar_prev, noise key)."""
    t, ab_t, ab_prev, k = step
    out = predict(x, t)
    z = jax.random.normal(k, x.shape, x.dtype) if sampler == "ddpm" or eta != 0 else None
    if sampler == "ddpm":
        return ddpm_step(x, out, ab_t, ab_prev, z, variance, prediction_type, clip_x0)[0]
    return ddim_step(x, out, ab_t, ab_prev, eta, z, prediction_type, clip_x0)[0]


def reverse_chain(predict, x, steps, sampler: str = "ddim", eta: float = 0.0, prediction_type: str = "epsilon",
                  variance: str = "beta_tilde", clip_x0: float | None = None, on_step=None,
                  return_trajectory: bool = False):
    """The reverse chain as one ``jax.lax.scan``: x_T -> x0 (traceable; call it inside ``jax.jit``).

    ``predict(x, t)`` is the (guided) model output at the scalar timestep t; ``steps`` the tuple of
    per-step arrays (timesteps int32, alpha_bar_t, alpha_bar_prev, noise keys), each of length N, as
    traced values, so new tables of the same length reuse the compiled program.  ``on_step(i, finite)``,
    if given, is called on the host after step i (0-based) through ``jax.debug.callback`` (a progress
    bar; ``finite``: whether every value of x is); calls are unordered, so a caller should take the
    largest i seen.
    Returns x0, or (x0, the stacked (N + 1, *shape) states x_T, ..., x0) with ``return_trajectory``.
    """
    def body(x, step):
        i, *step = step
        x = reverse_step(predict, x, step, sampler, eta, prediction_type, variance, clip_x0)
        if on_step is not None:
            jax.debug.callback(on_step, i, jnp.all(jnp.isfinite(x)))
        return x, (x if return_trajectory else None)

    x0, xs = jax.lax.scan(body, x, (jnp.arange(len(steps[0]), dtype=jnp.int32), *steps))
    if return_trajectory:
        return x0, jnp.concatenate([x[None], xs])
    return x0


def solver_step(predict, x, state, row: dict, key, solver, prediction_type: str = "epsilon"):
    """One row of a solver's tables: (x, state) -> (x, state); a stochastic solver draws its noise from ``key``."""
    noise = jax.random.normal(key, x.shape, x.dtype) if solver.stochastic else None
    return solver.step(predict, x, state, row, noise, prediction_type=prediction_type)


def solver_chain(predict, x, tables: dict, solver, prediction_type: str = "epsilon", keys=None, on_step=None):
    """Any sampler of ``minidiff.diffusion.solvers`` as one ``jax.lax.scan`` over its tables (a dict
    of (R,) arrays, traced: new tables of the same length reuse the program); ``keys`` (R,) give the
    fresh noise of stochastic solvers; ``on_step(i, finite)`` as in :func:`reverse_chain`."""
    rows = len(tables["t"])
    keys = jax.random.split(jax.random.key(0), rows) if keys is None else keys

    def body(carry, row):
        i, k, key = row
        x, state = solver_step(predict, *carry, k, key, solver, prediction_type)
        if on_step is not None:
            jax.debug.callback(on_step, i, jnp.all(jnp.isfinite(x)))
        return (x, state), None

    tables = {name: jnp.asarray(v, jnp.float32) for name, v in tables.items()}
    (x, _), _ = jax.lax.scan(body, (x, solver.init(x)), (jnp.arange(rows, dtype=jnp.int32), tables, keys))
    return x
