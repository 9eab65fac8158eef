"""Training a diffusion model (DDPM's objective) on toy data: a loss and a batch source on the engine.

    t ~ Uniform{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    loss = || f_theta(x_t, t[, y]) - target ||^2,   target = eps ("epsilon"), x0 ("sample")
           or v = sqrt(ab) eps - sqrt(1 - ab) x0 ("v_prediction")           (Ho et al. 2020, Algorithm 1)

then AdamW and the EMA of the parameters, which is what we sample from (:mod:`minidiff.train.engine`);
the batch of step s comes from ``np.random.default_rng([seed, s])``.  :func:`diffusion_loss` is shared
by every diffusion trainer.  ``Trainer(TrainConfig.create("moons"), run_dir).train()``, then
``load_denoiser(run_dir).sample(2000, seed=0, sampler="ddim", steps=50)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data import POINT_CLOUDS, TOY_MIXTURE
from ..diffusion import InferenceSchedule, q_sample, velocity
from ..diffusion.samplers import PREDICTION_TYPES
from ..images import save_samples, to_uint8, to_unit_range
from ..nn.denoisers import ClassTokens, PatchedDenoiser
from ..nn.mlp import MLPDenoiser
from ..nn.unet import UNet2DCondition, UNetConfig
from ..sampling import Sampler
from .configs import POINT_DATA, TrainConfig
from .engine import Engine, EngineTrainer, make_optimizer, read_run

def diffusion_loss(model_fn, x0, alpha_bar, key, prediction: str = "epsilon", min_snr_gamma: float | None = None):
    """The simple DDPM loss at uniformly random timesteps (Ho et al. 2020, Algorithm 1), mean over the batch.

    ``model_fn(x_t, t)`` is the network; ``alpha_bar`` the (T,) table of alpha_bar_t; ``prediction``
    "epsilon" (target eps), "v_prediction" (target v = sqrt(ab) eps - sqrt(1 - ab) x0) or "sample"
    (target x0).  ``min_snr_gamma``: Min-SNR weighting (Hang et al. 2023), every t weighs like an x0
    loss capped at gamma.  Used by every diffusion trainer: the toy models, the mini Stable Diffusion,
    textual inversion and DreamBooth.
    """
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}")
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, alpha_bar.shape[0])
    eps = jax.random.normal(k_eps, x0.shape)
    ab = alpha_bar[t]
    x_t = q_sample(x0, ab, eps)  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    target = {"epsilon": eps, "sample": x0}.get(prediction) if prediction != "v_prediction" else velocity(x0, eps, ab)
    out = model_fn(x_t, t)
    per_example = jnp.mean((out.astype(jnp.float32) - target).reshape(len(x0), -1) ** 2, axis=1)
    if min_snr_gamma:  # weight min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), / 1 (x0)
        snr = ab / (1 - ab)
        norm = {"epsilon": snr, "v_prediction": snr + 1, "sample": 1.0}[prediction]
        per_example = per_example * jnp.minimum(snr, min_snr_gamma) / norm
    return jnp.mean(per_example)


def builtin_pipeline():
    """The built-in model's pipeline (``minidiff/assets``), loaded once: its VAE gives the latent space of
    ``latent=True`` runs (32x32x3 pictures <-> 8x8x4 latents of unit spread)."""
    from ..pipeline import load_pipeline

    if not _BUILTIN:
        _BUILTIN.append(load_pipeline())
    return _BUILTIN[0]


_BUILTIN: list = []


# ---------------------------------------------------------------------------------------------
# Data: a pure function of (seed, step)
# ---------------------------------------------------------------------------------------------


class Batches:
    """``batches(step)`` -> (x0 float32, class labels int32 or None), drawn from default_rng([seed, step])."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.shapes = config.dataset() if config.data == "shapes" else None

    def __call__(self, step: int, n: int | None = None):
        cfg = self.config
        n = cfg.batch if n is None else n
        rng = np.random.default_rng([cfg.seed, step])
        if self.shapes is not None:
            images, labels, _ = self.shapes.sample(n, rng)
            y = labels["class"]
            # z_0 = E(x_0), the VAE's posterior mean (scaled), or the pixels in [-1, 1]
            x0 = builtin_pipeline().encode_images(images) if cfg.latent else to_unit_range(images)
        elif POINT_DATA[cfg.data] == "mixture":
            x0, y = TOY_MIXTURE.sample(n, rng)  # the same draws as data.gaussian_mixture, plus components
        else:
            x0, y = POINT_CLOUDS[POINT_DATA[cfg.data]](n, rng), None
        y = None if cfg.cond == "none" else np.asarray(y, np.int32)
        return np.asarray(x0, np.float32), y


# ---------------------------------------------------------------------------------------------
# The model, and sampling from it
# ---------------------------------------------------------------------------------------------


def build_model(config: TrainConfig):
    """The Flax module a config describes."""
    k = None if config.num_classes is None else config.num_classes + 1  # + the "no class" embedding
    if config.model == "mlp":
        return MLPDenoiser(num_class_embeds=k, **config.model_kwargs)

    p = config.patch_size
    kwargs = {key: tuple(v) if isinstance(v, list) else v for key, v in config.model_kwargs.items()}
    channels, size = (4, config.image_size // 4) if config.latent else (3 * p * p, config.image_size // p)
    if config.class_conditioning == "tokens" and k is not None:
        width = kwargs.pop("cross_attention_dim", 64)
        ds = config.dataset()
        unet = UNet2DCondition(UNetConfig.toy(in_channels=channels, sample_size=size, cross_attention_dim=width,
                                              **kwargs))
        unet = ClassTokens(unet, len(ds.shapes), len(ds.colors), width)
    else:
        unet = UNet2DCondition(UNetConfig.toy(in_channels=channels, sample_size=size, num_class_embeds=k, **kwargs))
    return unet if p == 1 else PatchedDenoiser(unet, p)


class Denoiser:
    """A diffusion model ready to sample: config, Flax module, parameters, compiled samplers.

    ``denoiser(params, x_t, t, cond)`` is the model output; :meth:`sample` runs the reverse chain
    and returns data: float32 points (n, 2) or uint8 images (n, H, W, 3).
    """

    def __init__(self, config: TrainConfig, params=None, step: int | None = None):
        self.config, self.params, self.step = config, params, step  # step: the training step of the params
        self.module = build_model(config)
        self._samplers: dict = {}

    def __call__(self, params, x, t, cond=None):
        return self.module.apply({"params": params}, x, t, class_labels=cond)

    @property
    def data_shape(self) -> tuple[int, ...]:
        s = self.config.image_size
        if self.config.latent:
            return (s // 4, s // 4, builtin_pipeline().vae_config.latent_channels)
        return (s, s, 3) if self.config.data == "shapes" else (2,)

    def sampler(self, sampler: str = "ddim", steps: int = 50, eta: float = 0.0, spacing: str = "leading") -> Sampler:
        """A compiled sampler, built once per (sampler, steps, eta, spacing) and then reused."""
        if not isinstance(steps, (int, np.integer)) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        key = (sampler, int(steps), float(eta), spacing)
        if key not in self._samplers:
            isc = InferenceSchedule.create(self.config.noise_schedule(), int(steps), spacing)
            self._samplers[key] = Sampler(self, isc, sampler, eta, self.config.prediction,
                                          clip_x0=1.0 if self.config.data == "shapes" and not self.config.latent
                                          else None)
        return self._samplers[key]

    def sample(self, n: int, seed: int = 0, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               class_labels=None, guidance_scale: float | None = None, params=None) -> np.ndarray:
        """n samples in data units.  ``class_labels``: one int or n ints (class-conditional models);
        ``guidance_scale``: classifier-free guidance against the "no class" label."""
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
        cond = uncond = None
        k = self.config.num_classes
        if k is None and (class_labels is not None or guidance_scale is not None):
            raise ValueError("this model is unconditional (trained with --cond none): it takes no class label "
                             "and no guidance")
        if guidance_scale is not None and not self.config.cond_drop > 0:
            raise ValueError("classifier-free guidance needs a model trained with --cond-drop > 0 "
                             "(this one never learned the 'no class' label)")
        if k is not None:
            if class_labels is None:
                class_labels = np.arange(n) % k  # every class in turn
            cond = np.broadcast_to(np.asarray(class_labels, np.int32), (n,))
            if cond.min() < 0 or cond.max() >= k:
                raise ValueError(f"class labels must lie in 0..{k - 1}, got {sorted(set(cond.tolist()))[:5]}...")
            if guidance_scale is not None:
                uncond = np.full(n, k, np.int32)
        s = self.sampler(sampler, steps, eta)
        x = s(self.params if params is None else params, jax.random.PRNGKey(seed), (n, *self.data_shape),
              cond=cond, uncond=uncond, guidance_scale=1.0 if guidance_scale is None else guidance_scale)
        if self.config.latent:  # x_0 = D(z_0)
            return builtin_pipeline().decode(x)
        x = np.asarray(x)
        return to_uint8(x) if self.config.data == "shapes" else x


def load_denoiser(run_dir, ema: bool = True) -> Denoiser:
    """The model saved in ``run_dir`` (its EMA parameters unless ``ema=False``)."""
    state, config, _ = read_run(run_dir, "diffusion")
    return Denoiser(TrainConfig.from_dict(config), state["ema_params" if ema else "params"], int(state["step"]))


# ---------------------------------------------------------------------------------------------
# Training: a loss and a batch source on the engine
# ---------------------------------------------------------------------------------------------


class Trainer(EngineTrainer):
    """Trains :class:`TrainConfig` on the engine; saves checkpoints and sample grids into ``run_dir``.

    ``state`` is the engine's: step, params, ema_params, opt_state, key (the run's base key).
    ``mesh``: train sharded over several devices (:func:`minidiff.train.sharding.make_mesh`).
    """

    kind, config_class = "diffusion", TrainConfig

    def __init__(self, config: TrainConfig, run_dir=None, mesh=None):
        self.config = config
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.denoiser = Denoiser(config)
        self.batches = Batches(config)
        self.alpha_bar = jnp.asarray(config.noise_schedule().alpha_bar, jnp.float32)  # alpha_bar_t, t = 0..T-1
        init_key, key = jax.random.split(jax.random.PRNGKey(config.seed))
        tx = make_optimizer(config.lr, config.steps, config.warmup, config.lr_decay, config.weight_decay,
                            config.grad_clip)
        samples = [(config.sample_every, lambda e: self.save_samples(
            self.run_dir / "samples" / f"step_{e.step:06d}.png"))] if self.run_dir is not None else []
        self.engine = Engine(self.loss, self.batches, self._init_params(init_key), tx, steps=config.steps, key=key,
                             ema_decay=config.ema_decay, run_dir=run_dir, config=dataclasses.asdict(config),
                             kind="diffusion", checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                             callbacks=samples, desc=f"train {config.data}", mesh=mesh)

    def _init_params(self, key):
        x0, y = self.batches(0, n=2)
        init = jax.jit(lambda k: self.denoiser.module.init(k, x0, jnp.zeros(2, jnp.int32), class_labels=y))
        # init runs once: compiling it without XLA's optimisations is several times faster
        return init.lower(key).compile({"xla_backend_optimization_level": 0})(key)["params"]

    def loss(self, params, batch, key, frozen=None):
        """The simple DDPM loss (:func:`diffusion_loss`), with the class dropped at rate cond_drop."""
        x0, y = batch
        cfg = self.config
        k_loss, k_drop, k_dropout = jax.random.split(key, 3)
        if y is not None and cfg.cond_drop > 0:  # sometimes train without the class: y = "no class"
            y = jnp.where(jax.random.bernoulli(k_drop, cfg.cond_drop, y.shape), cfg.num_classes, y)

        def model_fn(x_t, t):
            return self.denoiser.module.apply({"params": params}, x_t, t, class_labels=y, train=True,
                                              rngs={"dropout": k_dropout})

        return diffusion_loss(model_fn, x0, self.alpha_bar, k_loss, cfg.prediction, cfg.min_snr_gamma), {}

    def save_samples(self, path, n: int | None = None, seed: int = 0, sampler: str = "ddim", steps: int = 50) -> Path:
        """A grid (images) or scatter plot (points) of samples from the EMA parameters."""
        k = self.config.num_classes
        if n is None:
            n = (k * max(1, 64 // k) if k else 64) if self.config.data == "shapes" else 2000
        x = self.denoiser.sample(n, seed, sampler, steps, params=self.state["ema_params"])
        return save_samples(path, x, {"step": self.step, "sampler": sampler, "steps": steps, "seed": seed},
                            columns=k, reference=None if x.ndim == 4 else self.batches(10**9, n)[0])


# ---------------------------------------------------------------------------------------------
# How good are the samples?
# ---------------------------------------------------------------------------------------------


def evaluate(denoiser: Denoiser, n: int | None = None, sampler: str = "ddim", steps: int = 50, seed: int = 0,
             eta: float = 0.0, guidance_scale: float | None = None) -> dict:
    """Measure n samples against the data.

    - 2-D points (n = 5000): energy distance and MMD^2 (RBF, median bandwidth) between the samples
      and n fresh data points, next to the same statistics between two independent data draws of
      n points (the level a perfect model reaches: the statistics' own sampling noise).
    - shapes (n = 100 per class): the shapes classifier's reading of the samples
      (``minidiff.train.classifier``): with ``--cond class``, the fraction whose shape, colour, and
      both ("joint") are the requested ones; always the spread of the samples over the classes and
      over the 9 positions (total variation distance from uniform: 0 = evenly spread).
    """
    from ..metrics import energy_distance, mmd_rbf

    cfg = denoiser.config
    data = Batches(dataclasses.replace(cfg, cond="none"))
    if cfg.data != "shapes":
        n = n or 5000
        x = denoiser.sample(n, seed, sampler, steps, eta)
        ref, ref2 = data(10**9, n)[0], data(10**9 + 1, n)[0]  # never training batches (steps < 10**9)
        return {"n": n, "energy_distance": float(energy_distance(x, ref)),
                "energy_distance_data_vs_data": float(energy_distance(ref2, ref)),
                "mmd_rbf": float(mmd_rbf(x, ref)), "mmd_rbf_data_vs_data": float(mmd_rbf(ref2, ref))}

    from .classifier import cached_classifier, predict, score

    ds, k = cfg.dataset(), cfg.num_classes
    n = n or 100 * (k or ds.num_classes)
    labels = None if k is None else np.arange(n) % k
    images = denoiser.sample(n, seed, sampler, steps, eta, class_labels=labels, guidance_scale=guidance_scale)
    params = cached_classifier(ds)
    pred = predict(params, images)
    tv = lambda counts: 0.5 * np.abs(counts / counts.sum() - 1 / len(counts)).sum()  # noqa: E731
    out = {"n": n, "class_spread_tv": float(tv(np.bincount(ds.class_index(pred), minlength=ds.num_classes))),
           "position_spread_tv": float(tv(np.bincount(pred["position"], minlength=len(ds.positions))))}
    if labels is not None:
        out.update({f"accuracy_{a}": v for a, v in score(params, images, ds.class_labels(labels)).items()})
    return out


def read_history(run_dir) -> dict:
    """The loss history saved with a run: {"step": [...], "loss": [...]}."""
    return read_run(run_dir, "diffusion")[2].get("history", {"step": [], "loss": []})

