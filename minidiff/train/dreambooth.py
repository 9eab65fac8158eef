"""DreamBooth (Ruiz et al. 2023): fine-tune the UNet on 3-5 pictures of a subject, with prior preservation.

    instance pairs:  (x_i, "a sks circle in the top left")        the subject's pictures, rare identifier
    class pairs:     (x_pr, "a circle in the top left")            drawn first by the frozen model
    L(theta) = E || target - UNet_theta(z_t, t, c_instance) ||^2
             + lambda E || target - UNet_theta(z'_t, t', c_class) ||^2        (lambda = prior_weight)

The text encoder and VAE stay frozen (the paper may tune the text encoder too), so every caption's
text states are computed once.  The result is a whole UNet; ``remat=True`` (``jax.checkpoint``
around each UNet block) trades recomputation for activation memory.  Lesson 10; costs in the README.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import jax
import numpy as np

from ..pipeline import float32_params
from .configs import DreamBoothConfig
from .engine import Engine, make_optimizer
from .finetune import Subject, checkpoint_callbacks, latent_loss_fn, prior_preservation_loss, subject_batches


def class_pictures(pipe, subject: Subject, cfg: DreamBoothConfig, progress: bool = True):
    """The prior-preservation set: for each distinct class prompt (a caption without the
    identifier), ``cfg.class_images`` pictures drawn by the frozen model.  Returns (images, prompts)."""
    prompts = list(dict.fromkeys(subject.prompts("")))
    images = pipe(prompts, steps=cfg.class_steps, guidance_scale=cfg.class_guidance, seed=cfg.seed + 1,
                  num_images_per_prompt=cfg.class_images, height=subject.images.shape[1],
                  width=subject.images.shape[2], progress=progress)
    return images, [p for p in prompts for _ in range(cfg.class_images)]


def train_dreambooth(pipe, subject: Subject, config: DreamBoothConfig | None = None, progress: bool = True,
                     class_set=None, checkpoint=None, checkpoint_every: int = 0, run_dir=None, mesh=None):
    """Fine-tune the pipeline's UNet on the subject.  Returns (UNet params as float32 NumPy, history).

    ``class_set``: (images, prompts) to use as the prior-preservation pictures instead of drawing
    them (:func:`class_pictures`).  ``checkpoint(step, unet)`` is called every ``checkpoint_every``
    steps; ``run_dir`` keeps the engine's checkpoints (a stopped run continues); ``mesh``: train sharded
    (:func:`minidiff.train.sharding.make_mesh`).  ``pipe`` is not changed."""
    cfg = config or DreamBoothConfig()
    prior = cfg.prior_weight > 0
    if prior and class_set is None:
        class_set = class_pictures(pipe, subject, cfg, progress)

    diffusion = prior_preservation_loss(latent_loss_fn(pipe, remat=cfg.remat), cfg.prior_weight)
    batches = subject_batches(pipe, subject, cfg.identifier, class_set if prior else None, cfg.batch, cfg.seed)

    def loss(unet_params, batch, key, frozen=None):
        return diffusion(unet_params, batch, key), {}

    # AdamW keeps two moments per weight (the UNet 4x in memory with the gradients), Adafactor about 2x
    tx = make_optimizer(cfg.lr, cfg.steps, decay=False, weight_decay=1e-2, grad_clip=1.0, kind=cfg.optimizer)
    engine = Engine(loss, batches, float32_params(pipe.params["unet"]), tx, steps=cfg.steps,
                    key=jax.random.PRNGKey(cfg.seed), run_dir=run_dir, config={**asdict(cfg), "model": pipe.name},
                    kind="dreambooth", log_every=10, callbacks=checkpoint_callbacks(checkpoint, checkpoint_every, cfg.steps),
                    desc=f"dreambooth {cfg.identifier}", mesh=mesh).resume_or_start()
    start = time.perf_counter()
    history = {**engine.train(progress=progress), "seconds": time.perf_counter() - start, "config": asdict(cfg)}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), engine.params), history
