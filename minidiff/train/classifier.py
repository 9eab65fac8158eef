"""Train the shapes classifier, score pictures with it, and keep a trained one on disk.

    params = cached_classifier(ShapesDataset())          # trains once (about a minute), then loads
    images, labels, _ = ShapesDataset(seed=1).sample(2000)
    score(params, images, labels)   # {"shape": 1.0, "color": 1.0, "size": 0.99.., "position": 1.0, "joint": ..}

The classifier is the judge of generated pictures in later lessons: a sample of "a red circle in
the top left" counts as right when the classifier reads it as exactly that.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from .. import data
from ..data import ShapeSpec, ShapesDataset, caption, without_size
from ..images import to_unit_range
from ..nn.classifier import ShapesClassifier
from ..files import atomic_write
from .engine import Engine, make_optimizer

RECIPE_VERSION = 2  # bump when the architecture or the training recipe changes: old caches are ignored


def heads_for(dataset: ShapesDataset) -> tuple[tuple[str, int], ...]:
    """One classifier head per attribute of the dataset: (("shape", 3), ("color", 4), ...)."""
    return tuple((attr, len(values)) for attr, values in dataset.attributes.items())


def train_classifier(dataset: ShapesDataset, steps: int = 800, batch: int = 128, seed: int = 0,
                     lr: float = 2e-3, weight_decay: float = 1e-4, pool: int = 20_000,
                     progress: bool = False, run_dir=None) -> dict:
    """Train a :class:`ShapesClassifier` on ``dataset``; returns its params (``variables["params"]``).

    The training images are a fixed pool of ``pool`` pictures drawn once (with the seed), from which
    step s takes the batch default_rng([seed, 2, s]) picks; the loss is the sum of the heads'
    cross-entropies, minimised on the engine by AdamW with a warm-up then cosine-decaying learning rate.
    """
    images, labels, _ = dataset.sample(pool, np.random.default_rng(seed))
    heads = heads_for(dataset)
    x_pool = to_unit_range(images)                                   # float32 (pool, H, W, 3) in [-1, 1]
    y_pool = np.stack([labels[name] for name, _ in heads], axis=1)   # int (pool, n_heads)
    model = ShapesClassifier(heads)

    def batches(step):
        idx = np.random.default_rng([seed, 2, step]).integers(pool, size=batch)
        return x_pool[idx], y_pool[idx]

    def loss(params, batch, key, frozen=None):
        x, y = batch
        logits = model.apply({"params": params}, x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(logits[name], y[:, k]).mean()
                   for k, (name, _) in enumerate(heads)), {}

    params = model.init(jax.random.key(seed), x_pool[:1])["params"]
    tx = make_optimizer(lr, steps, warmup=min(100, steps // 10), weight_decay=weight_decay)
    settings = dict(dataset=dataset.settings(), steps=steps, batch=batch, seed=seed, lr=lr,
                    weight_decay=weight_decay, pool=pool)
    engine = Engine(loss, batches, params, tx, steps=steps, run_dir=run_dir, config=settings, kind="classifier",
                    log_every=100, desc="train classifier").resume_or_start()
    engine.train(progress=progress)
    return jax.device_get(engine.params)


@functools.lru_cache(maxsize=8)
def _jitted_apply(model: ShapesClassifier):
    return jax.jit(lambda p, x: {k: jnp.argmax(v, -1) for k, v in model.apply({"params": p}, x).items()})


def predict(params, images, batch: int = 1000) -> dict[str, np.ndarray]:
    """The classifier's reading of uint8 images (n, H, W, 3): attribute -> predicted label index."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"predict takes uint8 images (n, H, W, 3), got {images.dtype} {images.shape}")
    apply = _jitted_apply(ShapesClassifier.from_params(params))
    parts = [apply(params, to_unit_range(images[i:i + batch])) for i in range(0, len(images), batch)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]} if parts else {}


def score(params, images, labels: dict) -> dict[str, float]:
    """Accuracy per attribute, and "joint": the fraction with every scored attribute right.

    Scores the attributes that both the classifier and ``labels`` have (extra label keys, such as
    "class", are ignored).
    """
    pred = predict(params, images)
    attrs = [a for a in pred if a in labels]
    if not attrs:
        raise ValueError(f"labels {sorted(labels)} share no attribute with the classifier's {sorted(pred)}")
    right = {a: pred[a] == np.asarray(labels[a]) for a in attrs}
    out = {a: float(r.mean()) for a, r in right.items()}
    out["joint"] = float(np.logical_and.reduce(list(right.values())).mean())
    return out


def save_params(path, params) -> Path:
    """Write a parameter tree as msgpack (flax.serialization)."""
    return atomic_write(path, serialization.msgpack_serialize(jax.device_get(params)))


def load_params(path) -> dict:
    """Read a parameter tree written by :func:`save_params` (nested dicts of NumPy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"classifier params not found: {path}")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several kinds on a foreign or truncated file
        raise ValueError(f"cannot read {path} as classifier params: {e}") from None


def cache_dir() -> Path:
    """Where trained helpers are kept: $MINIDIFF_CACHE, else ~/.cache/minidiff."""
    return Path(os.environ.get("MINIDIFF_CACHE") or Path.home() / ".cache" / "minidiff")


def cached_classifier(dataset: ShapesDataset | None = None, steps: int = 800, batch: int = 128, seed: int = 0,
                      progress: bool = False) -> dict:
    """A classifier trained on ``dataset``'s attributes, trained once and then loaded from the cache.

    It is trained on *all* combinations (the dataset's exclude/include are dropped), so that it can
    also judge samples of held-out combinations.  The file name carries a hash of everything that
    defines the result: the dataset's attributes, image size and jitter, and the training settings.
    """
    dataset = replace(dataset or ShapesDataset(), exclude=(), include=(), seed=0)
    key = {k: v for k, v in dataset.settings().items() if k not in ("seed", "exclude", "include")}
    key.update(steps=steps, batch=batch, seed=seed, version=RECIPE_VERSION, drawing=data.drawing_constants())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"shapes_classifier_{digest}.msgpack"
    if path.is_file():
        try:
            return load_params(path)
        except ValueError:
            pass  # a damaged cache file: train again and overwrite it
    params = train_classifier(dataset, steps=steps, batch=batch, seed=seed, progress=progress)
    save_params(path, params)
    return params


def evaluation_prompts(dataset: ShapesDataset | None = None, size_word: bool = True) -> tuple[list[str], dict]:
    """The fixed prompt list of the text-to-image judges (DALL-E, the mini SD): every (shape, colour,
    position) of the dataset once, sizes alternating (or, with ``size_word=False``, no size named:
    "a red circle in the top left").

    Returns the captions and their labels (attribute -> int array), as the classifier reads them.
    """
    ds = dataset or ShapesDataset()
    captions, labels = [], {"shape": [], "color": [], "position": []}
    for i, (s, c, p) in enumerate(itertools.product(range(len(ds.shapes)), range(len(ds.colors)),
                                                    range(len(ds.positions)))):
        size = ds.sizes[i % len(ds.sizes)]
        text = caption(ShapeSpec(ds.shapes[s], ds.colors[c], size, ds.positions[p]))
        captions.append(text if size_word else without_size(text))
        for name, v in (("shape", s), ("color", c), ("position", p)):
            labels[name].append(v)
    return captions, {k: np.array(v) for k, v in labels.items()}
