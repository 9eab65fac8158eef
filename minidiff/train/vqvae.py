"""Training a VQ-VAE on the shapes (``minidiff train-vqvae``), and measuring it.

    x_hat, k, aux = VQVAE(x)                  x (B, H, W, 3) in [-1, 1]; EMA mode moves the codebook
    loss = mean |x - x_hat| + aux["loss"]     (codebook + beta * commitment; or ``reconstruction="l2"``;
                                               ``foreground_weight`` w counts shape pixels 1 + w times)

then an Adam step on :mod:`minidiff.train.engine`.  Every ``restart_every`` steps the codes no
encoder output chose in that window are moved onto random encoder outputs of the last batch
(``minidiff.vq.restart_dead_codes``).  With ``model={"quantizer": "gumbel"}`` it trains DALL-E's dVAE:
the decoder sees a Gumbel-softmax sample at temperature ``config.tau(step)``, aux["loss"] is the
weighted KL to the uniform prior, and there are no restarts.

The VQGAN experiment (``adversarial_weight``, ``perceptual_weight``; Esser et al. 2021) adds

    + w_adv * (-mean D(x_hat))                       the decoder tries to pass as real patches
    + w_perc * sum_l mean |n(phi_l(x)) - n(phi_l(x_hat))|^2   phi_l: a shapes classifier's conv features,
                                                       n: unit length over the channels (as LPIPS)
    + mean relu(1 - D(x)) + mean relu(1 + D(sg x_hat))   the discriminator's hinge loss

(the adversarial terms from step ``disc_start`` on).  The discriminator's parameters sit beside the
VQ-VAE's in one tree and one Adam step updates both: stop-gradients keep each loss to its own side
(D is frozen inside the decoder's term, x_hat inside D's).  VQGAN weighs the adversarial term
adaptively (by the ratio of gradient norms at the decoder's last layer); this uses a fixed weight,
and the perceptual network is a shapes classifier trained with another seed than the judge's
(VQGAN's LPIPS uses VGG features).  Exports ``VQVAETrainer``, ``load_vqvae`` and
``evaluate_vqvae`` (PSNR, ``fraction_used``, ``perplexity``, classifier accuracy on held-out pictures).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import vq
from ..metrics import edge_strength
from ..data import ShapesDataset, to_uint8, to_unit_range
from ..nn.classifier import ShapesClassifier
from ..nn.discriminator import PatchDiscriminator
from ..nn.vqvae import VQVAE, psnr
from .autoencoder import reconstruction_loss
from .configs import VQVAETrainConfig
from .engine import Engine, EngineTrainer, make_optimizer, read_run

HELD_OUT_SEED = 10**6  # evaluation images come from this rng seed, never from a training batch's


def shapes_batch(dataset: ShapesDataset, seed: int, step: int, n: int):
    """Images in [-1, 1] (n, H, W, 3), their labels and captions: a pure function of (seed, step)."""
    images, labels, captions = dataset.sample(n, np.random.default_rng([seed, step]))
    return to_unit_range(images), labels, captions


class VQVAETrainer(EngineTrainer):
    """The VQ-VAE's loss and batches on the engine; the EMA codebook statistics and the code counts
    of the current restart window are the engine's ``model_state``."""

    kind, config_class = "vqvae", VQVAETrainConfig

    def __init__(self, config: VQVAETrainConfig, run_dir=None):
        self.config = config
        self.model = VQVAE(config.model_config())
        self.dataset = config.dataset()
        x0 = self.batch(0)[0]
        variables = self.model.init(jax.random.PRNGKey(config.seed), x0)
        params, frozen = variables["params"], None
        self.discriminator = PatchDiscriminator()
        if config.adversarial_weight:
            params = {**params, "discriminator": self.discriminator.init(jax.random.PRNGKey(config.seed + 1), x0)["params"]}
        if config.perceptual_weight:
            from .classifier import cached_classifier

            frozen = cached_classifier(self.dataset, seed=1)  # not the judge's (seed 0) network
            self.perceptual = ShapesClassifier.from_params(frozen)
        state = {"variables": {k: v for k, v in variables.items() if k != "params"},
                 "counts": jnp.zeros(self.model.config.num_codes, jnp.int32)}   # codes chosen since the last restart
        restarts = [(config.restart_every, self._restart)] if config.restart_every else []
        self.engine = Engine(self.loss, self.batch, params, make_optimizer(config.lr, config.steps, config.warmup),
                             steps=config.steps, model_state=state, run_dir=run_dir, frozen=frozen,
                             config=dataclasses.asdict(config), kind="vqvae", checkpoint_every=config.checkpoint_every,
                             log_every=config.restart_every or 100, callbacks=restarts)
        self._encode = jax.jit(lambda variables, x: self.model.apply(variables, x, method=lambda m, x: m.encoder(x)))

    def batch(self, step: int):
        """(images, the dVAE's temperature at this step, the adversarial weight at this step)."""
        c = self.config
        x = shapes_batch(self.dataset, c.seed, step, c.batch)[0]
        return x, np.float32(c.tau(step)), np.float32(c.adversarial_weight if step >= c.disc_start else 0.0)

    def loss(self, params, batch, key, frozen, state):
        x, tau, adversarial = batch
        params, disc = without_discriminator(params), params.get("discriminator")
        variables = state["variables"]
        mode = dict(tau=tau, rngs={"gumbel": key}) if self.model.config.quantizer == "gumbel" else dict(update=True)
        (x_hat, indices, aux), new = self.model.apply({"params": params, **variables}, x, mutable=list(variables), **mode)
        rec = reconstruction_loss(x, x_hat, self.config.reconstruction, self.config.foreground_weight)
        counts = state["counts"] + jnp.bincount(indices.ravel(), length=self.model.config.num_codes)
        mse = jnp.mean((x_hat - x) ** 2)
        total, logs = rec + aux["loss"], {"psnr": 10 * jnp.log10(4.0 / mse)}
        if "kl" in aux:
            logs["kl"] = aux["kl"]
        if frozen is not None:  # perceptual: LPIPS's distance, in the classifier's feature maps
            logs["perceptual"] = perceptual_distance(self.perceptual, frozen, x, x_hat)
            total = total + self.config.perceptual_weight * logs["perceptual"]
        if disc is not None:
            D = lambda p, im: self.discriminator.apply({"params": p}, im)  # noqa: E731
            logs["generator"] = -jnp.mean(D(jax.lax.stop_gradient(disc), x_hat))  # moves the decoder only
            logs["discriminator"] = (jnp.mean(jax.nn.relu(1 - D(disc, x)))  # moves D only
                                     + jnp.mean(jax.nn.relu(1 + D(disc, jax.lax.stop_gradient(x_hat)))))
            total = total + adversarial * logs["generator"] + (adversarial > 0) * logs["discriminator"]
        return total, {**logs, "model_state": {"variables": dict(new), "counts": counts}}

    def _restart(self, engine: Engine):
        """Move codes unused in the last window onto this batch's encoder outputs (EMA statistics reset
        to match); the choice is drawn from default_rng([seed, 1, step])."""
        step, state = engine.step, engine.state["model_state"]
        counts = np.asarray(state["counts"])
        history = engine.history
        history.setdefault("fraction_used", []).append(float((counts > 0).mean()))
        n = 0
        if step < self.config.steps:
            z = self._encode(self.variables(), self.batch(step - 1)[0])  # the encoder outputs of the last batch
            n = self._restart_codes(engine, counts, np.asarray(z), np.random.default_rng([self.config.seed, 1, step]))
        history.setdefault("restarted", []).append(n)
        engine.state = {**engine.state, "model_state": {**engine.state["model_state"],
                                                         "counts": jnp.zeros_like(state["counts"])}}

    def _restart_codes(self, engine: Engine, counts, z, rng) -> int:
        variables, params = engine.state["model_state"]["variables"], engine.params
        ema = "vq_ema" in variables
        book = np.asarray(variables["vq_ema"]["quantizer"]["codebook"] if ema else params["quantizer"]["codebook"])
        new, n = vq.restart_dead_codes(book, counts, z.reshape(-1, book.shape[1]), rng)
        if n == 0:
            return 0
        if ema:
            dead = counts < 1
            stats = dict(variables["vq_ema"]["quantizer"])
            stats["codebook"] = jnp.asarray(new)
            stats["cluster_size"] = jnp.where(dead, 1.0, stats["cluster_size"])
            stats["embed_sum"] = jnp.where(dead[:, None], new, stats["embed_sum"])
            variables = {**variables, "vq_ema": {"quantizer": stats}}
            engine.state = {**engine.state, "model_state": {**engine.state["model_state"], "variables": variables}}
        else:
            params = {**params, "quantizer": {**params["quantizer"], "codebook": jnp.asarray(new)}}
            engine.state = {**engine.state, "params": params}
        return n

    def variables(self) -> dict:
        return {"params": without_discriminator(self.engine.params), **self.engine.state["model_state"]["variables"]}


def perceptual_distance(classifier: ShapesClassifier, params, x, y):
    """sum over layers l of the mean over positions of |n(phi_l(x)) - n(phi_l(y))|^2, with phi_l the
    classifier's l-th feature map and n(f) = f / |f| over the channels (LPIPS without its learned
    per-channel weights; Zhang et al. 2018).  0 for y = x; at most 4 per layer."""
    unit = lambda f: f / (jnp.linalg.norm(f, axis=-1, keepdims=True) + 1e-8)  # noqa: E731
    fx, fy = (classifier.apply({"params": params}, im, features=True) for im in (x, y))
    return sum(jnp.mean(jnp.sum((unit(a) - unit(b)) ** 2, -1)) for a, b in zip(fx, fy))


def without_discriminator(params: dict) -> dict:
    """The VQ-VAE's own parameters (a VQGAN run keeps its discriminator's beside them)."""
    return {k: v for k, v in params.items() if k != "discriminator"}



def load_vqvae(run_dir):
    """(VQVAE module, variables, training config) saved by ``minidiff train-vqvae``."""
    state, config, _ = read_run(run_dir, "vqvae")
    cfg = VQVAETrainConfig.from_dict(config)
    variables = jax.tree.map(jnp.asarray, {"params": without_discriminator(state["params"]),
                                           **state["model_state"]["variables"]})
    return VQVAE(cfg.model_config()), variables, cfg


def evaluate_vqvae(model: VQVAE, variables, config: VQVAETrainConfig | None = None, n: int = 1000,
                   batch: int = 250, judge: bool = True) -> dict:
    """Reconstructions of ``n`` held-out images: PSNR (dB, images in [0, 1] scale), codebook use,
    perplexity, ``edge_ratio`` (the reconstructions' :func:`~minidiff.metrics.edge_strength` over the
    pictures': below 1 is blur), and (``judge``) the shapes classifier's accuracy on the reconstructions.

    PSNR alone flatters this data: most pixels are black background, so a reconstruction that
    blurs the shape into a blob still scores ~28 dB.  The classifier asks the question that
    matters for the DALL-E model downstream: is the shape still recognisable?
    """
    dataset = (config or VQVAETrainConfig()).dataset()
    x, labels, _ = shapes_batch(dataset, HELD_OUT_SEED, 0, n)
    apply = jax.jit(lambda x: model.apply(variables, x))
    psnrs, indices, recon = [], [], []
    start = time.perf_counter()
    for i in range(0, n, batch):
        x_hat, idx, _ = apply(x[i : i + batch])
        x_hat = jnp.clip(x_hat, -1, 1)
        psnrs.append(np.asarray(psnr(x_hat, x[i : i + batch])))
        indices.append(np.asarray(idx))
        recon.append(to_uint8(np.asarray(x_hat)))
    indices = np.concatenate(indices)
    K = model.config.num_codes
    out = {"n": n, "psnr_mean": float(np.concatenate(psnrs).mean()),
           "psnr_of_mean_mse": float(-10 * np.log10(np.mean(10 ** (-np.concatenate(psnrs) / 10)))),
           "fraction_used": vq.fraction_used(indices, K), "perplexity": vq.perplexity(indices, K),
           "edge_ratio": edge_strength(np.concatenate(recon)) / edge_strength(to_uint8(np.asarray(x))),
           "codes": K, "grid": list(indices.shape[1:]), "seconds": time.perf_counter() - start}
    if judge:
        from .classifier import cached_classifier, score

        scores = score(cached_classifier(dataset), np.concatenate(recon), labels)
        out.update({f"reconstruction_accuracy_{k}": v for k, v in scores.items()})
    return out
