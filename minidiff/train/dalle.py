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

import jax
import jax.numpy as jnp
import numpy as np

from ..data import CaptionTokenizer, ShapesDataset, to_uint8, without_size
from ..nn import dalle
from ..nn.vqvae import VQVAE
from .configs import DALLE_GUIDANCE, DalleTrainConfig
from .engine import Engine, EngineTrainer, make_optimizer, read_run
from .vqvae import VQVAETrainConfig, load_vqvae, shapes_batch



def model_config(model: dict, tokenizer: CaptionTokenizer, vqvae: VQVAE, image_size: int) -> dalle.DalleConfig:
    try:
        return dalle.DalleConfig(text_vocab=tokenizer.vocab_size, text_len=tokenizer.length,
                                 num_codes=vqvae.config.num_codes, grid=image_size // vqvae.config.factor, **model)
    except TypeError as e:
        names = [f.name for f in dataclasses.fields(dalle.DalleConfig)]
        raise ValueError(f"bad transformer setting in {model}: {e}; the settings are {', '.join(names)}") from None


class DalleTrainer(EngineTrainer):
    """The transformer's loss and token batches on the engine; the frozen VQ-VAE travels with every
    checkpoint (an attachment), so that the run folder alone can generate."""

    kind, config_class = "dalle", DalleTrainConfig

    def __init__(self, config: DalleTrainConfig, run_dir=None):
        self.config = config
        self.vqvae, vq_variables, self.vq_config = load_vqvae(config.vqvae)
        self.tokenizer = CaptionTokenizer()
        self.model = dalle.DalleTransformer(model_config(config.model, self.tokenizer, self.vqvae,
                                                         self.vq_config.image_size))
        self.dataset = ShapesDataset(size=self.vq_config.image_size, seed=config.seed)
        c = self.model.config
        params = self.model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, c.seq_len), jnp.int32))["params"]
        tx = make_optimizer(config.lr, config.steps, config.warmup, weight_decay=config.weight_decay, grad_clip=1.0)
        self._encode = jax.jit(lambda v, x: self.vqvae.apply(v, x, method=VQVAE.encode)[1])
        self.engine = Engine(self.loss, lambda step: (self.tokens(step)[0],), params, tx, steps=config.steps,
                             key=jax.random.PRNGKey(config.seed + 1), run_dir=run_dir,
                             config=dataclasses.asdict(config), kind="dalle", checkpoint_every=config.checkpoint_every,
                             log_every=config.log_every, attachments={"vqvae": vq_variables},
                             info={"vqvae_config": dataclasses.asdict(self.vq_config)})

    @property
    def vq_variables(self):
        return self.engine.attachments["vqvae"]

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
        codes = np.asarray(self._encode(self.vq_variables, x)).reshape(n, -1)
        return np.concatenate([text, codes], axis=1).astype(np.int32), captions

    def loss(self, params, batch, key, frozen=None):
        (tokens,) = batch
        return dalle.loss_fn(self.model, params, tokens, self.config.image_weight, train=True, rngs={"dropout": key})

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
                 guidance_scale: float = DALLE_GUIDANCE, use_cache: bool = True, batch: int = 128,
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
    state, config, meta = read_run(run_dir, "dalle")
    cfg = DalleTrainConfig.from_dict(config)
    vq_cfg = VQVAETrainConfig.from_dict(meta["vqvae_config"])
    vqvae = VQVAE(vq_cfg.model_config())
    tokenizer = CaptionTokenizer()
    model = dalle.DalleTransformer(model_config(cfg.model, tokenizer, vqvae, vq_cfg.image_size))
    as_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return DalleGenerator(model, as_jnp(state["params"]), vqvae, as_jnp(state["attachments"]["vqvae"]), tokenizer)


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
