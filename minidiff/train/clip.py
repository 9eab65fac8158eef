"""Training a toy CLIP contrastively on captioned shapes (Radford et al. 2021), for the mini SD.

    logits_ij = exp(s) <t_i, v_j>      t_i, v_j: unit-length text and image embeddings of a batch of B pairs
    loss = symmetric cross-entropy (rows: captions -> images, columns: images -> captions)

A caption repeated in the batch spreads the target of row i evenly over its matches (the identity
with unique captions, CLIP's loss).  The text tower is then frozen and its per-token states
condition the UNet; the image tower is only a teacher.  Exports ``clip_loss``, ``train_clip``,
``retrieval_accuracy``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..data import ShapesDataset
from ..images import to_unit_range
from ..nn.clip import CLIPTextConfig, ContrastiveCLIP
from ..tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from .engine import Engine, make_optimizer


def clip_loss(text_emb, image_emb, logit_scale, same):
    """Symmetric cross-entropy over exp(logit_scale) * cos(t_i, v_j); ``same[i, j]``: pair j's caption
    equals pair i's (True on the diagonal) -- those are all counted as matches."""
    t = text_emb / jnp.linalg.norm(text_emb, axis=-1, keepdims=True)
    v = image_emb / jnp.linalg.norm(image_emb, axis=-1, keepdims=True)
    logits = jnp.exp(logit_scale) * t @ v.T  # (B, B): caption i vs image j
    target = same / same.sum(axis=1, keepdims=True)  # same is symmetric, so it serves both directions
    text_to_image = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1)
    image_to_text = -jnp.sum(target * jax.nn.log_softmax(logits.T, axis=1), axis=1)
    return 0.5 * (text_to_image.mean() + image_to_text.mean())


def train_clip(dataset: ShapesDataset, text_config: CLIPTextConfig | None = None, steps: int = 600,
               batch: int = 128, lr: float = 1e-3, seed: int = 0, embed_dim: int = 64,
               tokenizer: CLIPTokenizer | None = None, progress: bool = True, run_dir=None) -> tuple[dict, dict]:
    """Train :class:`ContrastiveCLIP` on ``dataset``'s pictures and captions on the engine (AdamW,
    warmup then cosine decay; exp(s) clipped at 100 after every update, as CLIP does).

    Returns (params, history): params["text_model"] is the text encoder for the UNet; history has
    ``step``, ``loss`` and ``seconds``.  The batch of step s is drawn from default_rng([seed, 1, s]):
    a pure function of the arguments; ``run_dir`` keeps checkpoints (a stopped run continues).
    """
    text_config = text_config or CLIPTextConfig.toy()
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_gz()
    model = ContrastiveCLIP(text_config, embed_dim=embed_dim)

    def batches(step):
        images, _, captions = dataset.sample(batch, np.random.default_rng([seed, 1, step]))
        captions = np.asarray(captions)
        same = (captions[:, None] == captions[None, :]).astype(np.float32)
        return tokenizer(list(captions), CONTEXT_LENGTH), to_unit_range(images), same

    def loss(params, batch, key, frozen=None):
        ids, x, same = batch
        return clip_loss(*model.apply({"params": params}, ids, x), same), {}

    def constrain(params):  # CLIP clips exp(s) at 100
        return {**params, "logit_scale": jnp.minimum(params["logit_scale"], np.log(100.0))}

    ids, x, _ = batches(0)
    params = model.init(jax.random.PRNGKey(seed), ids[:2], x[:2])["params"]
    settings = dict(dataset=dataset.settings(), text=dataclasses.asdict(text_config), steps=steps, batch=batch, lr=lr,
                    seed=seed, embed_dim=embed_dim)
    tx = make_optimizer(lr, steps, warmup=min(100, steps // 10), weight_decay=1e-4, grad_clip=1.0)
    engine = Engine(loss, batches, params, tx, steps=steps, constrain=constrain, run_dir=run_dir, config=settings,
                    kind="clip", log_every=25, desc="train CLIP").resume_or_start()
    start = time.perf_counter()
    history = engine.train(progress=progress)
    return jax.device_get(engine.params), {**history, "seconds": time.perf_counter() - start}


def retrieval_accuracy(params, dataset: ShapesDataset, n: int = 512, seed: int = 1, text_config=None,
                       embed_dim: int = 64, tokenizer: CLIPTokenizer | None = None) -> float:
    """Zero-shot reading of fresh pictures: the fraction whose most similar caption, among all of
    the dataset's captions, is their own."""
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_gz()
    model = ContrastiveCLIP(text_config or CLIPTextConfig.toy(), embed_dim=embed_dim)
    images, _, truth = dataset.sample(n, np.random.default_rng([seed, 2]))
    captions = dataset.captions()
    t = model.apply({"params": params}, tokenizer(captions, CONTEXT_LENGTH), method=ContrastiveCLIP.encode_text)
    v = model.apply({"params": params}, to_unit_range(images), method=ContrastiveCLIP.encode_image)
    best = np.argmax(np.asarray(v @ (t / jnp.linalg.norm(t, axis=-1, keepdims=True)).T), axis=1)
    return float(np.mean(np.asarray(captions)[best] == np.asarray(truth)))
