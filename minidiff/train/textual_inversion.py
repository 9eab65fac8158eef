"""Textual inversion (Gal et al. 2022): teach a frozen model a new word by learning one embedding vector.

    tokenizer:  "<ring>" -> a new id v = 49408;   text table E (49408, D) -> [E; e_v] (49409, D)
    caption:    "a <ring> circle in the top left" -> CLIP([E; e_v]) -> context c(e_v)
    learn:      e_v* = argmin_{e_v} E_{x, t, eps} || target - UNet(z_t, t, c(e_v)) ||^2    (UNet, VAE, CLIP frozen)

e_v starts from a word's row (``init_word``) and is the only optax parameter: the loss writes it
into the frozen table (``table.at[v].set(e_v)``), so every other weight is bit-identical and a
prompt without the word gives the same picture.  The result is D numbers in diffusers'
``learned_embeds.safetensors`` layout (one tensor named by the token, (1, D)), loaded with
``minidiff txt2img --embedding``.  The word can only steer the model to what it can already draw
(lesson 10); a new look needs DreamBooth (:mod:`minidiff.train.dreambooth`).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np

from ..nn.clip import CLIPTextModel, table_with
from ..pipeline import float32_params
from .configs import TextualInversionConfig
from .engine import Engine, make_optimizer
from .finetune import Subject, checkpoint_callbacks, latent_loss_fn


# --- training ------------------------------------------------------------------------------------------

def train_textual_inversion(pipe, subject: Subject, config: TextualInversionConfig | None = None,
                            progress: bool = True, checkpoint=None, checkpoint_every: int = 0, run_dir=None):
    """Learn the embedding of ``config.token`` from the subject's pictures and captions.

    Returns (vector (D,) float32, history).  ``pipe`` is left unchanged (the token is added to a copy
    of its tokenizer and text encoder for the training).  ``checkpoint(step, vector)`` is called every
    ``checkpoint_every`` steps; ``run_dir`` keeps the engine's checkpoints (a stopped run continues)."""
    cfg = config or TextualInversionConfig()
    init = pipe.tokenizer.encode(cfg.init_word)
    if len(init) != 1:
        raise ValueError(f"the initial word must be one token of the vocabulary, {cfg.init_word!r} is {len(init)}")
    if cfg.token in pipe.tokenizer.encoder:
        raise ValueError(f"{cfg.token!r} is already a token of this model; choose a new one")
    table = np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"], np.float32)

    work = pipe.with_params()  # its own params dict and placement (add_tokens copies the tokenizer)
    work.add_tokens({cfg.token: table[init[0]]})
    token_id = work.tokenizer.encoder[cfg.token]
    ids = jnp.asarray(work.tokenize(subject.prompts(cfg.token)))
    latents = work.encode_images(subject.images)
    text_model = CLIPTextModel(work.text_config)
    diffusion = latent_loss_fn(work)

    def loss(vector, batch, key, frozen):
        (z0, caption_ids), (text, unet) = batch, frozen
        context = text_model.apply({"params": table_with(text, token_id, vector)}, caption_ids,
                                   clip_skip=work.clip_skip).last_hidden_state
        return diffusion(unet, z0, context, key), {}

    def batches(step):
        i = np.random.default_rng([cfg.seed, 3, step]).integers(len(latents), size=cfg.batch)
        return latents[i], ids[i]

    frozen = (float32_params(work.params["text_encoder"]), float32_params(work.params["unet"]))
    engine = Engine(loss, batches, jnp.asarray(table[init[0]]), make_optimizer(cfg.lr, cfg.steps, decay=False),
                    steps=cfg.steps, key=jax.random.PRNGKey(cfg.seed), frozen=frozen, run_dir=run_dir,
                    config={**asdict(cfg), "model": pipe.name}, kind="textual-inversion", log_every=10,
                    callbacks=checkpoint_callbacks(checkpoint, checkpoint_every, cfg.steps),
                    desc=f"textual inversion {cfg.token}").resume_or_start()
    start = time.perf_counter()
    history = {**engine.train(progress=progress), "seconds": time.perf_counter() - start, "config": asdict(cfg)}
    return np.asarray(engine.params, np.float32), history
