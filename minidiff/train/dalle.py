"""Training the DALL-E-style transformer on captioned shapes (``minidiff train-dalle``), and using it.

Each step draws fresh pictures, turns them into VQ-VAE codes with the frozen encoder, and trains
the transformer on  caption tokens ++ codes  (``minidiff.nn.dalle``).  With probability
``cond_drop`` a caption is replaced by the empty one (all pads), so the same model also learns
p(image) and sampling can use classifier-free guidance.

The run folder holds the transformer *and* a copy of the VQ-VAE it was trained with, so that
``minidiff dalle "a blue square in the bottom right" --checkpoint runs/dalle`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data import CaptionTokenizer, ShapesDataset, to_uint8, without_size
from ..nn import dalle
from ..nn.vqvae import VQVAE
from .checkpoint import load_checkpoint, save_checkpoint
from .vqvae import VQVAETrainConfig, load_vqvae, lr_schedule, shapes_batch

# The default classifier-free guidance scale on the logits.  Measured on the README's run (432 samples,
# temperature 1): all three attributes right in 81 % at s = 1, 88 % at s = 2, 70 % at s = 3 -- past ~2
# the extrapolated logits favour codes the plain model finds unlikely, and colour and position break.
GUIDANCE = 2.0


@dataclass
class DalleTrainConfig:
    vqvae: str = "runs/vqvae"
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    cond_drop: float = 0.1  # probability of training on the empty caption (for guidance)
    size_word_drop: float = 0.5  # probability of a caption without its size word ("a red circle on the left")
    image_weight: float = 7 / 8  # DALL-E's loss weights: 1/8 text, 7/8 image
    seed: int = 0
    model: dict = field(default_factory=lambda: {"width": 128, "layers": 4, "heads": 4,
                                                 "attention": ["row", "column"]})
    checkpoint_every: int = 500

    def __post_init__(self):
        for name in ("steps", "batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cond_drop", "size_word_drop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "DalleTrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def model_config(model: dict, tokenizer: CaptionTokenizer, vqvae: VQVAE, image_size: int) -> dalle.DalleConfig:
    try:
        return dalle.DalleConfig(text_vocab=tokenizer.vocab_size, text_len=tokenizer.length,
                                 num_codes=vqvae.config.num_codes, grid=image_size // vqvae.config.factor, **model)
    except TypeError as e:
        names = [f.name for f in dataclasses.fields(dalle.DalleConfig)]
        raise ValueError(f"bad transformer setting in {model}: {e}; the settings are {', '.join(names)}") from None


class DalleTrainer:
    def __init__(self, config: DalleTrainConfig, run_dir=None):
        self.config, self.run_dir = config, None if run_dir is None else Path(run_dir)
        self.vqvae, self.vq_variables, self.vq_config = load_vqvae(config.vqvae)
        self.tokenizer = CaptionTokenizer()
        self.model = dalle.DalleTransformer(model_config(config.model, self.tokenizer, self.vqvae,
                                                         self.vq_config.image_size))
        self.dataset = ShapesDataset(size=self.vq_config.image_size, seed=config.seed)
        lr = lr_schedule(config.lr, config.warmup, config.steps)
        self.optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=config.weight_decay))
        c = self.model.config
        self.params = self.model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, c.seq_len), jnp.int32))["params"]
        self.opt_state = self.optimizer.init(self.params)
        self.step = 0
        self.history = {"step": [], "loss": [], "text": [], "image": []}
        self._encode = jax.jit(lambda x: self.vqvae.apply(self.vq_variables, x, method=VQVAE.encode)[1])
        self._update = jax.jit(self._update_fn)

    def tokens(self, step: int, n: int | None = None):
        """Training sequences for ``step``: (int32 (n, Lt + G*G), captions).  A fraction ``size_word_drop``
        of the captions leave out the size word; a fraction ``cond_drop`` are dropped (all pads)."""
        cfg = self.config
        n = n or cfg.batch
        x, _, captions = shapes_batch(self.dataset, cfg.seed, step, n)
        rng = np.random.default_rng([cfg.seed, step, 1])
        drop, short = rng.random(n) < cfg.cond_drop, rng.random(n) < cfg.size_word_drop
        captions = [without_size(c) if s else c for c, s in zip(captions, short)]
        text = self.tokenizer.encode(captions)
        text[drop] = CaptionTokenizer.PAD
        codes = np.asarray(self._encode(x)).reshape(n, -1)
        return np.concatenate([text, codes], axis=1).astype(np.int32), captions

    def _update_fn(self, params, opt_state, tokens, key):
        def loss(p):
            return dalle.loss_fn(self.model, p, tokens, self.config.image_weight, train=True, rngs={"dropout": key})

        (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, parts

    def train(self, progress: bool = True, log_every: int = 50) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        key = jax.random.PRNGKey(cfg.seed + 1)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="train dalle", unit="step")
        try:
            while self.step < cfg.steps:
                tokens, _ = self.tokens(self.step)
                self.params, self.opt_state, loss, parts = self._update(
                    self.params, self.opt_state, tokens, jax.random.fold_in(key, self.step))
                self.step += 1
                bar.update()
                if self.step % log_every == 0 or self.step == cfg.steps:
                    for name, value in (("loss", loss), ("text", parts["text"]), ("image", parts["image"])):
                        self.history[name].append(float(value))
                    self.history["step"].append(self.step)
                    bar.set_postfix(loss=f"{float(loss):.3f}", image=f"{float(parts['image']):.3f}")
                if self.run_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        if self.run_dir is not None:
            self.save()
        return self.history

    def save(self) -> Path:
        state = {"step": self.step, "params": self.params, "vqvae": self.vq_variables}
        return save_checkpoint(self.run_dir, jax.device_get(state), dataclasses.asdict(self.config),
                               {"history": self.history, "kind": "dalle",
                                "vqvae_config": dataclasses.asdict(self.vq_config)})

    def generator(self) -> "DalleGenerator":
        return DalleGenerator(self.model, self.params, self.vqvae, self.vq_variables, self.tokenizer)


class DalleGenerator:
    """Captions -> pictures: sample codes with the transformer, decode them with the VQ-VAE."""

    def __init__(self, model, params, vqvae, vq_variables, tokenizer=None):
        self.model, self.params, self.vqvae, self.vq_variables = model, params, vqvae, vq_variables
        self.tokenizer = tokenizer or CaptionTokenizer(model.config.text_len)
        self._sample = jax.jit(self._sample_fn, static_argnames=("top_k", "use_cache", "guided"))

    def _sample_fn(self, params, vq_variables, text, key, temperature, top_k, guidance_scale, use_cache, guided):
        codes = dalle.sample(self.model, params, text, key, temperature, top_k, guidance_scale, use_cache, guided)
        g = self.model.config.grid
        images = self.vqvae.apply(vq_variables, codes.reshape(-1, g, g), method=VQVAE.decode_indices)
        return codes, images

    def generate(self, captions, seed: int = 0, temperature: float = 1.0, top_k: int | None = None,
                 guidance_scale: float = GUIDANCE, use_cache: bool = True, batch: int = 128,
                 return_codes: bool = False):
        """uint8 images (n, H, W, 3) for n captions (one picture each; repeat a caption for more)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        text = self.tokenizer.encode(captions)
        key = jax.random.PRNGKey(seed)
        codes, images = [], []
        for i in range(0, len(text), batch):
            c, x = self._sample(self.params, self.vq_variables, text[i : i + batch], jax.random.fold_in(key, i),
                                jnp.float32(temperature), top_k, jnp.float32(guidance_scale), use_cache,
                                guidance_scale != 1.0)
            codes.append(np.asarray(c))
            images.append(to_uint8(np.asarray(x)))
        images = np.concatenate(images)
        return (images, np.concatenate(codes)) if return_codes else images


def load_dalle(run_dir) -> DalleGenerator:
    """The generator saved by ``minidiff train-dalle``."""
    state, config, meta = load_checkpoint(run_dir)
    if meta.get("kind") != "dalle":
        raise ValueError(f"{run_dir} does not hold a DALL-E model (made by `minidiff train-dalle`)")
    cfg = DalleTrainConfig.from_dict(config)
    vq_cfg = VQVAETrainConfig.from_dict(meta["vqvae_config"])
    vqvae = VQVAE(vq_cfg.model_config())
    tokenizer = CaptionTokenizer()
    model = dalle.DalleTransformer(model_config(cfg.model, tokenizer, vqvae, vq_cfg.image_size))
    as_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return DalleGenerator(model, as_jnp(state["params"]), vqvae, as_jnp(state["vqvae"]), tokenizer)


def evaluate_dalle(generator: DalleGenerator, samples_per_prompt: int = 2, seed: int = 0, size_word: bool = True,
                   **sampling) -> dict:
    """Fraction of pictures whose shape, colour and position (all three: "joint") the classifier reads
    as the prompt's, over :func:`evaluation_prompts` (with or without their size word); plus sampling speed."""
    from .classifier import cached_classifier, evaluation_prompts, score

    captions, labels = evaluation_prompts(size_word=size_word)
    captions = captions * samples_per_prompt
    labels = {k: np.tile(v, samples_per_prompt) for k, v in labels.items()}
    generator.generate(captions[:8], seed=seed, **sampling)  # compile
    start = time.perf_counter()
    images = generator.generate(captions, seed=seed, **sampling)
    seconds = time.perf_counter() - start
    out = {f"accuracy_{k}": v for k, v in score(cached_classifier(ShapesDataset()), images, labels).items()}
    tokens = len(captions) * generator.model.config.image_len
    out.update(n=len(captions), prompts=len(captions) // samples_per_prompt, seconds=seconds,
               image_tokens_per_s=tokens / seconds)
    return out


def sampling_speed(generator: DalleGenerator, n: int = 16, **sampling) -> dict:
    """Image tokens per second for a batch of n, with and without the key-value cache."""
    from .classifier import evaluation_prompts

    captions = evaluation_prompts()[0][:n]
    out = {}
    for use_cache in (True, False):
        generator.generate(captions, use_cache=use_cache, **sampling)  # compile
        start = time.perf_counter()
        generator.generate(captions, seed=1, use_cache=use_cache, **sampling)
        out["tokens_per_s_" + ("cache" if use_cache else "no_cache")] = \
            n * generator.model.config.image_len / (time.perf_counter() - start)
    return out
