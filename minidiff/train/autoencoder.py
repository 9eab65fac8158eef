"""Train a small AutoencoderKL (SD's VAE architecture) on crops of a few photographs, on a CPU.

    q(z | x) = N(mu, sigma^2) = encode(x);   z = mu + sigma * eps;   x_hat = decode(z)
    loss = mean |x - x_hat| + kl_weight * KL(q || N(0, I)) / (c * c * 3)       x: crops (B, c, c, 3) in [-1, 1]

The ldm autoencoders' loss (KL weight 1e-6) per pixel value, without its LPIPS and adversarial
terms, which need a second trained network (lesson 7); ``reconstruction="l2"`` uses the squared
error.  Images come as uint8 (H, W, 3) or float in [-1, 1], never paths.  After training, set
``scaling_factor = 1 / z.std()``, as SD's 0.18215 was chosen.  Exports ``train_vae``, ``vae_loss``,
``reconstruction_loss``, ``random_crops``, ``init_params``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..images import to_unit_range
from ..nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
from .configs import RECONSTRUCTIONS
from .engine import Engine, make_optimizer


def _as_float_images(images) -> list[np.ndarray]:
    """A list of (H, W, 3) float32 arrays in [-1, 1], from uint8 or float images (list or stacked array)."""
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"images must be (H, W, 3) RGB arrays, got shape {im.shape}")
        out.append(to_unit_range(im) if im.dtype == np.uint8 else im.astype(np.float32))
    if not out:
        raise ValueError("need at least one image to train on")
    return out


def init_params(config: AutoencoderKLConfig, seed: int = 0, size: int | None = None) -> dict:
    """Fresh parameters for ``AutoencoderKL(config)``, drawn with NumPy into the shapes that
    ``jax.eval_shape`` reads off ``model.init`` (tracing only: no compile, which on a small CPU takes
    longer than drawing).  Same laws as Flax's defaults: kernels truncated-normal LeCun
    (std sqrt(1 / fan_in), cut at 2 std, fan_in = kh * kw * C_in for a conv), biases 0, GroupNorm scales 1."""
    size = size or config.downsample_factor
    model = AutoencoderKL(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, config.in_channels))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            w = rng.standard_normal(leaf.shape)
            while (bad := np.abs(w) > 2).any():                      # truncate at 2 std by redrawing
                w[bad] = rng.standard_normal(int(bad.sum()))
            return jnp.asarray(w / 0.87962566 * np.sqrt(1.0 / fan_in), jnp.float32)  # 0.8796: std of N(0,1) cut at 2
        return jnp.ones(leaf.shape, jnp.float32) if name == "scale" else jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def random_crops(images, n: int, size: int, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """``n`` random ``size`` x ``size`` crops (float32 (n, size, size, 3) in [-1, 1]) of randomly chosen
    images, each mirrored left-right with probability 1/2 when ``flip``."""
    images = _as_float_images(images)
    small = [im.shape[:2] for im in images if min(im.shape[:2]) < size]
    if small:
        raise ValueError(f"crop size {size} is larger than an image of size {small[0]}")
    out = np.empty((n, size, size, 3), np.float32)
    for i, k in enumerate(rng.integers(len(images), size=n)):
        im = images[k]
        y, x = rng.integers(im.shape[0] - size + 1), rng.integers(im.shape[1] - size + 1)
        crop = im[y : y + size, x : x + size]
        out[i] = crop[:, ::-1] if flip and rng.random() < 0.5 else crop
    return out


def foreground_weighted_mean(error, x, foreground_weight: float = 0.0):
    """The mean of ``error`` (B, H, W, C) in which every pixel of x (images in [-1, 1]) that is not
    black (some channel above -0.9) counts 1 + foreground_weight times; the plain mean at weight 0."""
    weight = 1.0 + foreground_weight * (jnp.max(x, axis=-1, keepdims=True) > -0.9)   # (B, H, W, 1)
    return jnp.mean(weight * error) / jnp.mean(weight)


def check_reconstruction(reconstruction: str):
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")


def reconstruction_loss(x, x_hat, reconstruction: str = "l1", foreground_weight: float = 0.0):
    """The autoencoders' reconstruction term: mean |x - x_hat| ("l1", SD's) or mean (x - x_hat)^2
    ("l2"), shape pixels counted 1 + foreground_weight times (:func:`foreground_weighted_mean`)."""
    check_reconstruction(reconstruction)
    error = jnp.abs(x - x_hat) if reconstruction == "l1" else (x - x_hat) ** 2
    return foreground_weighted_mean(error, x, foreground_weight)


def vae_loss(model: AutoencoderKL, params, x, key, kl_weight: float = 1e-6, reconstruction: str = "l1",
             foreground_weight: float = 0.0):
    """(loss, aux) for a batch x in [-1, 1]; ``reconstruction`` "l1" (mean |x - x_hat|, SD's) or "l2"
    (mean (x - x_hat)^2).  aux holds the mean L1 and squared error, the mean KL per image (nats, summed
    over the latent) and the mean posterior sigma.

    ``foreground_weight`` w > 0 makes the reconstruction term a weighted mean in which every pixel
    that is not black (some channel above -0.9) counts 1 + w times: for pictures of small objects on
    a black background (the shapes), where a plain mean is ruled by the background and a decoder that
    draws every object as a blob of the mean colour already scores well."""
    posterior = model.apply({"params": params}, x, method=AutoencoderKL.encode)
    z = posterior.sample(key)                                   # z = mu + sigma * eps
    x_hat = model.apply({"params": params}, z, method=AutoencoderKL.decode)
    l1 = jnp.mean(jnp.abs(x - x_hat))                           # mean |x - x_hat|
    mse = jnp.mean((x - x_hat) ** 2)                            # mean (x - x_hat)^2
    kl = jnp.mean(posterior.kl())                               # KL(q(z|x) || N(0, I)), per image
    rec = reconstruction_loss(x, x_hat, reconstruction, foreground_weight)
    loss = rec + kl_weight * kl / np.prod(x.shape[1:])          # ldm's loss / number of pixel values
    return loss, {"l1": l1, "mse": mse, "kl": kl, "sigma": jnp.mean(posterior.std)}


def train_vae(images, config: AutoencoderKLConfig, steps: int = 400, batch: int = 16, crop: int = 32,
              lr: float = 1e-3, kl_weight: float = 1e-6, reconstruction: str = "l1", seed: int = 0, params=None,
              log_every: int = 10, progress: bool = False, foreground_weight: float = 0.0,
              init_logvar: float | None = None, run_dir=None):
    """Train ``AutoencoderKL(config)`` on random crops of ``images`` on the engine: Adam after
    gradient clipping, the learning rate warmed up then cosine-decayed.

    ``foreground_weight``: see :func:`vae_loss`.  ``init_logvar``: start the posterior's log-variance
    there (the logvar half of quant_conv's bias) instead of at 0.  With logvar 0 the sampled z carries
    noise of standard deviation 1, far larger than the spread of the means early on; a long run (SD's)
    learns to shrink it, a few hundred steps do not, and the decoder then learns to draw the average
    picture.  SD's trained VAE ends with a small sigma anyway, so starting small (-6: sigma 0.05)
    changes where training starts, not what it aims at.

    Returns ``(params, history)``; history holds lists ``step``, ``loss``, ``l1``, ``mse``, ``kl``,
    ``sigma`` (means over every ``log_every`` steps) and ``seconds``.  Pass ``params`` to continue
    training; ``run_dir`` keeps checkpoints (a stopped run continues from it).  The batch of step s
    is drawn from default_rng([seed, s]): the run is a pure function of its arguments.
    """
    if steps < 0 or batch < 1:
        raise ValueError(f"need steps >= 0 and batch >= 1, got steps={steps}, batch={batch}")
    check_reconstruction(reconstruction)
    if crop % config.downsample_factor:
        raise ValueError(f"crop {crop} must be a multiple of the downsampling factor {config.downsample_factor}")
    images = _as_float_images(images)
    model = AutoencoderKL(config)
    if params is None:
        params = init_params(config, seed)
        if init_logvar is not None:
            if not config.use_quant_conv:
                raise ValueError("init_logvar sets quant_conv's bias, but this config has use_quant_conv=False")
            C = config.latent_channels
            params["quant_conv"]["bias"] = params["quant_conv"]["bias"].at[C:].set(init_logvar)

    if steps == 0:
        return params, {"step": [], "loss": [], "seconds": 0.0}

    def batches(step):
        return (random_crops(images, batch, crop, np.random.default_rng([seed, step])),)

    def loss(params, batch, key, frozen=None):
        return vae_loss(model, params, batch[0], key, kl_weight, reconstruction, foreground_weight)

    settings = dict(config=dataclasses.asdict(config), steps=steps, batch=batch, crop=crop, lr=lr, kl_weight=kl_weight,
                    reconstruction=reconstruction, seed=seed, foreground_weight=foreground_weight,
                    init_logvar=init_logvar, images=len(images))
    engine = Engine(loss, batches, params, make_optimizer(lr, steps, warmup=min(50, steps // 10), grad_clip=1.0),
                    steps=steps, key=jax.random.PRNGKey(seed), run_dir=run_dir, config=settings, kind="vae",
                    log_every=log_every, desc="train VAE").resume_or_start()
    start = time.perf_counter()
    history = engine.train(progress=progress)
    return engine.params, {**history, "seconds": time.perf_counter() - start}
