"""LoRA (Hu et al. 2021): fine-tune a frozen model through low-rank updates of a few of its weights.

For each adapted linear layer W (d_out x d_in; the UNet's attention projections by default):

    W' = W + (alpha / r) B A          A = down (r x d_in), B = up (d_out x r),  r << d_in, d_out
    A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)),   B = 0        (so W' = W at step 0: training starts at the model)

Only the A's and B's are optax parameters: r (d_in + d_out) numbers per layer instead of d_in d_out.
The loss is DreamBooth's (:func:`minidiff.train.finetune.prior_preservation_loss`: the subject's
pictures with a rare identifier, plus the class pictures the frozen model draws), computed with W'
written into the frozen tree inside the step (in Flax's (d_in, d_out) layout: W'^T = W^T + (alpha/r) A^T B^T).
Optionally the text encoder's projections are adapted too; then the captions' text states are
computed in the step.  The result is a LoRA file in the diffusers / PEFT layout (alpha / r
multiplied into B), loaded by ``minidiff txt2img --lora`` (:mod:`minidiff.lora`) and by diffusers'
``load_lora_weights``.  Lesson 10 sets it beside textual inversion and DreamBooth.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from ..lora import module_name, replace_leaves
from ..nn.clip import CLIPTextModel
from ..pipeline import float32_params
from .configs import LoRAConfig
from .dreambooth import class_pictures
from .engine import Engine, make_optimizer
from .finetune import Subject, checkpoint_callbacks, latent_loss_fn, prior_preservation_loss, subject_batches

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_targets(tree, names, part: str = "unet") -> dict[str, tuple]:
    """{diffusers module name: its Flax path} for the Dense layers of ``tree`` (the ``part`` "unet" or
    "text_encoder" of a pipeline's params) whose last name is one of ``names`` ("to_q", "to_out_0", "q_proj")."""
    return {module_name(part, path[:-1]): path[:-1] for path, w in flatten_dict(tree).items()
            if path[-1] == "kernel" and path[-2] in names and np.ndim(w) == 2}


def init_adapters(tree, targets: dict, rank: int, key) -> dict:
    """{module: {"down": A (r, d_in), "up": B = 0 (d_out, r)}}, A uniform in +-1/sqrt(d_in) (PEFT's)."""
    out = {}
    for k, (name, path) in zip(jax.random.split(key, max(len(targets), 1)), sorted(targets.items())):
        d_in, d_out = _get(tree, path)["kernel"].shape
        bound = 1 / np.sqrt(d_in)
        out[name] = {"down": jax.random.uniform(k, (rank, d_in), jnp.float32, -bound, bound),
                     "up": jnp.zeros((d_out, rank), jnp.float32)}
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def with_adapters(tree, adapters: dict, targets: dict, factor: float):
    """The tree with every adapted kernel W^T replaced by W^T + factor A^T B^T (factor = alpha / r)."""
    return replace_leaves(tree, {(*targets[name], "kernel"): _get(tree, targets[name])["kernel"]
                                 + factor * (f["down"].T @ f["up"].T) for name, f in adapters.items()})


def lora_layers(adapters: dict, factor: float) -> dict:
    """{(part, module): (down, up)} as :func:`minidiff.lora.save_lora` writes them (factor multiplied into up)."""
    return {(part, name): (np.asarray(f["down"], np.float32), factor * np.asarray(f["up"], np.float32))
            for part, layers in adapters.items() for name, f in layers.items()}


def train_lora(pipe, subject: Subject, config: LoRAConfig | None = None, progress: bool = True, class_set=None,
               checkpoint=None, checkpoint_every: int = 0, run_dir=None, mesh=None):
    """Train rank-r adapters of the pipeline's UNet (and text encoder) on the subject.

    Returns (adapters {"unet": {module: {"down", "up"}}, ("text_encoder": ...)} as float32 NumPy, history);
    :func:`lora_layers` + :func:`minidiff.lora.save_lora` write them.  ``class_set``, ``checkpoint``,
    ``run_dir`` and ``mesh`` as in :func:`minidiff.train.dreambooth.train_dreambooth`.  ``pipe`` is not changed."""
    cfg = config or LoRAConfig()
    prior = cfg.prior_weight > 0
    if prior and class_set is None:
        class_set = class_pictures(pipe, subject, cfg, progress)
    factor = (cfg.alpha or cfg.rank) / cfg.rank
    frozen = {"unet": float32_params(pipe.params["unet"])}
    targets = {"unet": lora_targets(frozen["unet"], cfg.targets)}
    if not targets["unet"]:
        raise ValueError(f"no layer of the UNet is named {', '.join(cfg.targets)}; LoRA targets are the last names "
                         "of Dense layers, e.g. to_q, to_k, to_v, to_out_0, proj_in, ff.net_0.proj")
    if cfg.text_encoder:
        frozen["text_encoder"] = float32_params(pipe.params["text_encoder"])
        targets["text_encoder"] = lora_targets(frozen["text_encoder"], TEXT_TARGETS, "text_encoder")
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    adapters = {part: init_adapters(frozen[part], t, cfg.rank, k) for (part, t), k in zip(targets.items(), keys[1:])}

    diffusion = prior_preservation_loss(latent_loss_fn(pipe), cfg.prior_weight)
    batches = subject_batches(pipe, subject, cfg.identifier, class_set if prior else None, cfg.batch, cfg.seed,
                              token_ids=cfg.text_encoder)
    text_model = CLIPTextModel(pipe.text_config)

    def loss(adapters, batch, key, frozen):
        unet = with_adapters(frozen["unet"], adapters["unet"], targets["unet"], factor)
        if not cfg.text_encoder:
            return diffusion(unet, batch, key), {}
        text = with_adapters(frozen["text_encoder"], adapters["text_encoder"], targets["text_encoder"], factor)

        def encode(ids):
            return text_model.apply({"params": text}, ids, clip_skip=pipe.clip_skip).last_hidden_state

        return diffusion(unet, batch, key, encode), {}

    engine = Engine(loss, batches, adapters, make_optimizer(cfg.lr, cfg.steps, decay=False, grad_clip=1.0),
                    steps=cfg.steps, key=keys[0], frozen=frozen, run_dir=run_dir,
                    config={**asdict(cfg), "model": pipe.name}, kind="lora", log_every=10,
                    callbacks=checkpoint_callbacks(checkpoint, checkpoint_every, cfg.steps),
                    desc=f"lora r={cfg.rank} {cfg.identifier}", mesh=mesh).resume_or_start()
    start = time.perf_counter()
    history = {**engine.train(progress=progress), "seconds": time.perf_counter() - start, "config": asdict(cfg),
               "parameters": int(sum(np.size(x) for x in jax.tree.leaves(engine.params)))}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), engine.params), history
