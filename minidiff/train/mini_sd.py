"""The built-in mini Stable Diffusion, trained from scratch on captioned shapes by ``minidiff train-mini-sd``.

SD's recipe in miniature (``MiniSDConfig``), three stages, each frozen before the next; the result
is one converted-model file (``mini_sd.safetensors`` + ``.json``, float16 weights).

1. VAE (:func:`train_mini_vae`): an ``AutoencoderKL`` at f = 4 (32x32x3 <-> 8x8x4), L1 with the shape
   pixels weighted 11x, posterior sigma started at 0.05, scored by :func:`reconstruction_accuracy`;
   :func:`whiten_latents` folds per-channel whitening into it, so ``scaling_factor`` is 1.
2. A CLIP text tower (SD's tokenizer, width 64) trained contrastively (:mod:`minidiff.train.clip`);
   its ``last_hidden_state`` (77 x 64) is the UNet's context.
3. A ``UNet2DCondition`` (:func:`train_mini_unet`): :func:`diffusion_loss`, v-prediction, cosine
   schedule, 10 % empty captions (for guidance).  ``held_out`` (shape, colour) pairs are never drawn
   in training; :func:`evaluate_prompt_following` asks for them too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from ..data import caption_words, without_size
from ..diffusion import NoiseSchedule
from ..files import atomic_write
from ..images import to_uint8, to_unit_range
from ..nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
from ..nn.clip import CLIPTextConfig, CLIPTextModel
from ..nn.unet import UNet2DCondition
from ..pipeline import vae_decode, vae_encode
from ..tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from .autoencoder import train_vae
from .configs import PREDICTION, SCHEDULER, MiniSDConfig
from .engine import Engine, make_optimizer
from .clip import retrieval_accuracy, train_clip
from .diffusion import diffusion_loss

def _save(path: Path, tree) -> None:
    atomic_write(path, serialization.msgpack_serialize(jax.device_get(tree)))


def _load(path: Path):
    return serialization.msgpack_restore(path.read_bytes())


# --- stage 1: the autoencoder ---------------------------------------------------------------------

def train_mini_vae(cfg: MiniSDConfig, progress: bool = True, run_dir=None) -> tuple[dict, AutoencoderKLConfig, dict]:
    """(params, config, history): the autoencoder as trained, before :func:`whiten_latents`."""
    images = cfg.dataset().sample(4096, np.random.default_rng([cfg.seed, 10]))[0]
    config = cfg.vae_config()
    params, history = train_vae(images, config, steps=cfg.vae_steps, batch=cfg.vae_batch, crop=cfg.image_size,
                                lr=cfg.vae_lr, seed=cfg.seed, progress=progress,
                                foreground_weight=cfg.vae_foreground_weight,
                                init_logvar=cfg.vae_init_logvar, run_dir=run_dir)
    return params, config, history


def reconstruction_accuracy(vae_params, vae_config: AutoencoderKLConfig, cfg: MiniSDConfig, n: int = 300) -> dict:
    """How much of a picture survives the autoencoder: the shapes classifier's accuracy on
    decode(encode(x)) for ``n`` fresh pictures (held-out pairs included).  The UNet can only draw
    what the decoder can, so this bounds the prompt following of the whole model."""
    from .classifier import cached_classifier, score

    ds = cfg.dataset(held_out=False)
    images, labels, _ = replace(ds, seed=cfg.seed + 7).sample(n)

    def roundtrip(p, x):
        return vae_decode(p, vae_encode(p, x, config=vae_config, dtype="float32"), config=vae_config, dtype="float32")

    decoded = np.concatenate([np.asarray(roundtrip(vae_params, to_unit_range(images[i:i + 100])))
                              for i in range(0, n, 100)])
    return score(cached_classifier(ds), to_uint8(decoded), labels)


def whiten_latents(params, config: AutoencoderKLConfig, images) -> tuple[dict, AutoencoderKLConfig]:
    """The same autoencoder, re-parametrised so that its latents have mean 0 and standard deviation 1
    in every channel (scaling_factor 1): z' = (z - mu) / sigma, folded into the 1x1 convolutions.

    A small VAE's latent channels sit far from 0 (here means of -0.7..1.5 with standard deviations
    of 0.3..0.4); one global scaling_factor, SD's only knob, cannot remove that, and the diffusion
    model then sees a faint picture on a large offset.  ``quant_conv`` makes the posterior's
    (mean, logvar): its mean outputs become (W x + b - mu) / sigma, its logvar outputs shift by
    -2 log sigma; ``post_quant_conv`` takes z = sigma z' + mu, i.e. W' = W diag(sigma),
    b' = b + W mu.  Reconstructions do not change (up to rounding); the file format is SD's.
    """
    model = AutoencoderKL(config)
    z = np.asarray(model.apply({"params": params}, to_unit_range(np.asarray(images)), method=AutoencoderKL.encode).mean)
    mu, sigma = z.mean(axis=(0, 1, 2)), z.std(axis=(0, 1, 2))
    C = config.latent_channels
    q, post = dict(params["quant_conv"]), dict(params["post_quant_conv"])
    qk, qb = np.array(q["kernel"], np.float64), np.array(q["bias"], np.float64)
    qk[..., :C] /= sigma
    qb[:C] = (qb[:C] - mu) / sigma
    qb[C:] -= 2 * np.log(sigma)
    pk, pb = np.array(post["kernel"], np.float64), np.array(post["bias"], np.float64)
    pb = pb + mu @ pk[0, 0]
    pk = pk * sigma[None, None, :, None]
    dtype = np.asarray(q["kernel"]).dtype
    out = {**params, "quant_conv": {"kernel": qk.astype(dtype), "bias": qb.astype(dtype)},
           "post_quant_conv": {"kernel": pk.astype(dtype), "bias": pb.astype(dtype)}}
    return out, replace(config, scaling_factor=1.0)


# --- stage 3: the UNet ----------------------------------------------------------------------------

def encode_pool(cfg: MiniSDConfig, vae_params, vae_config, batch: int = 512):
    """``cfg.pool`` training pictures as latents (the posterior mean times scaling_factor) and the
    index of each one's caption in ``cfg.dataset().captions()``."""
    ds = cfg.dataset()
    index = {c: i for i, c in enumerate(ds.captions())}
    images, _, captions = ds.sample(cfg.pool, np.random.default_rng([cfg.seed, 30]))
    latents = np.concatenate([np.asarray(vae_encode(vae_params, to_unit_range(images[i:i + batch]),
                                                    config=vae_config, dtype="float32"))
                              for i in range(0, len(images), batch)])
    return latents, np.array([index[c] for c in captions], np.int32)


def text_states(text_params, text_config: CLIPTextConfig, prompts, tokenizer: CLIPTokenizer | None = None):
    """The frozen text encoder's ``last_hidden_state`` for each prompt: (P, 77, D) float32."""
    tokenizer = tokenizer or CLIPTokenizer.from_bpe_gz()
    ids = tokenizer(list(prompts), CONTEXT_LENGTH)
    return np.asarray(CLIPTextModel(text_config).apply({"params": text_params}, ids).last_hidden_state)


def prompt_captions(cfg: MiniSDConfig) -> tuple[list[str], np.ndarray]:
    """The captions the UNet is trained on: every combination's caption (``cfg.dataset().captions()``,
    in that order), then the same without the size word ("a red circle in the top left"), so that a
    prompt need not name every attribute; and for caption i, the index of its shorter form."""
    full = cfg.dataset().captions()
    short = [without_size(c) for c in full]
    unique = list(dict.fromkeys(short))
    return full + unique, np.array([len(full) + unique.index(c) for c in short], np.int32)


def train_mini_unet(cfg: MiniSDConfig, latents, caption_index, contexts, progress: bool = True, shorter=None,
                    run_dir=None):
    """Train the UNet on (latent, caption) pairs on the engine; ``contexts`` (P + 1, 77, D): every
    caption's text states, the last row the empty prompt's (they enter the compiled step as frozen
    arguments).  ``shorter[i]``: the row of caption i without its size word, used instead of it in a
    fraction ``cfg.size_word_drop`` of the pairs.  Step s trains on the pairs default_rng([seed, 31, s])
    picks.  Returns (EMA params, history)."""
    model = UNet2DCondition(cfg.unet_config())
    alpha_bar = jnp.asarray(NoiseSchedule.from_name(SCHEDULER["beta_schedule"], 1000).alpha_bar, jnp.float32)
    contexts = jnp.asarray(contexts)
    shorter = jnp.arange(len(contexts)) if shorter is None else jnp.asarray(shorter)
    empty = contexts.shape[0] - 1

    def batches(step):
        idx = np.random.default_rng([cfg.seed, 31, step]).integers(len(latents), size=cfg.unet_batch)
        return latents[idx], caption_index[idx]

    def loss(params, batch, key, frozen):
        (x0, cap), (contexts, shorter) = batch, frozen
        k_drop, k_short, k_loss = jax.random.split(key, 3)
        cap = jnp.where(jax.random.bernoulli(k_short, cfg.size_word_drop, cap.shape), shorter[cap], cap)
        cap = jnp.where(jax.random.bernoulli(k_drop, cfg.cond_drop, cap.shape), empty, cap)  # "" for CFG
        return diffusion_loss(lambda x_t, t: model.apply({"params": params}, x_t, t, contexts[cap]), x0, alpha_bar,
                              k_loss, PREDICTION), {}

    key = jax.random.PRNGKey(cfg.seed)
    params = jax.jit(model.init)(key, jnp.zeros((1, *latents.shape[1:])), jnp.zeros(1, jnp.int32),
                                 contexts[:1])["params"]
    tx = make_optimizer(cfg.unet_lr, cfg.unet_steps, warmup=200, grad_clip=1.0)
    engine = Engine(loss, batches, params, tx, steps=cfg.unet_steps, key=key, frozen=(contexts, shorter),
                    ema_decay=cfg.ema_decay, run_dir=run_dir, config=stage_settings(cfg)["unet"], kind="mini-sd-unet",
                    desc="train UNet").resume_or_start()
    start = time.perf_counter()
    history = engine.train(progress=progress)
    return jax.device_get(engine.state["ema_params"]), {**history, "seconds": time.perf_counter() - start}


# --- all three, and the model file ----------------------------------------------------------------

def stage_settings(cfg: MiniSDConfig) -> dict:
    """The settings each stage's result depends on: the VAE and CLIP on their own fields (and the
    data), the UNet on everything (it is trained on both)."""
    everything = dataclasses.asdict(cfg)
    data = {k: everything[k] for k in ("seed", "image_size", "held_out")}
    own = lambda prefixes: {**data, **{k: v for k, v in everything.items() if k.startswith(prefixes)}}  # noqa: E731
    return {"vae": own(("vae_",)), "clip": own(("text_", "clip_")), "unet": everything}


def train_mini_sd(cfg: MiniSDConfig | None = None, out="runs/mini_sd", progress: bool = True,
                  check_vae: bool = True) -> Path:
    """Train the three stages (each stage's result is kept in ``out`` and reused if present, and each
    stage checkpoints into ``out/runs``, so an interrupted run continues where it was) and write ``out/mini_sd.safetensors`` + .json.
    ``check_vae``: score the autoencoder's reconstructions with the shapes classifier
    (:func:`reconstruction_accuracy`, kept in history.json)."""
    from ..convert import save_converted
    from ..sdconfig import StableDiffusionConfig

    cfg = cfg or MiniSDConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "settings.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else {}
    new = json.loads(json.dumps(stage_settings(cfg)))  # tuples as lists, as read back from the file
    log = json.loads((out / "history.json").read_text()) if (out / "history.json").is_file() else {}
    runs = out / "runs"  # each stage's checkpoints: a stopped stage continues where it was
    for name in ("vae", "clip", "unet"):              # a stage made by another recipe is made afresh
        if old.get(name) != new[name]:
            shutil.rmtree(runs / name, ignore_errors=True)
        if old.get(name) != new[name] or not (out / f"{name}.msgpack").is_file():
            (out / f"{name}.msgpack").unlink(missing_ok=True)
            log.pop(name, None)
    stamp.write_text(json.dumps(new, indent=1, sort_keys=True))

    if (out / "vae.msgpack").is_file():
        vae_params, vae_config = _load(out / "vae.msgpack"), cfg.vae_config()
    else:
        vae_params, vae_config, log["vae"] = train_mini_vae(cfg, progress, runs / "vae")
        _save(out / "vae.msgpack", vae_params)
    if check_vae and "reconstruction_accuracy" not in log.get("vae", {}):
        accuracy = reconstruction_accuracy(vae_params, vae_config, cfg)
        log.setdefault("vae", {})["reconstruction_accuracy"] = accuracy
        if progress:
            print("autoencoder: the shapes classifier on its reconstructions:",
                  ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    pictures = cfg.dataset().sample(1024, np.random.default_rng([cfg.seed, 11]))[0]
    vae_params, vae_config = whiten_latents(vae_params, vae_config, pictures)

    text_config = cfg.text_config()
    if (out / "clip.msgpack").is_file():
        clip_params = _load(out / "clip.msgpack")
    else:
        clip_params, log["clip"] = train_clip(cfg.dataset(), text_config, steps=cfg.clip_steps, batch=cfg.clip_batch,
                                              seed=cfg.seed, embed_dim=cfg.text_width, progress=progress,
                                              run_dir=runs / "clip")
        log["clip"]["retrieval_accuracy"] = retrieval_accuracy(clip_params, cfg.dataset(held_out=False),
                                                               text_config=text_config, embed_dim=cfg.text_width)
        _save(out / "clip.msgpack", clip_params)
    text_params = clip_params["text_model"]

    if (out / "unet.msgpack").is_file():
        unet_params = _load(out / "unet.msgpack")
    else:
        captions, shorter = prompt_captions(cfg)
        contexts = text_states(text_params, text_config, [*captions, ""])
        latents, caption_index = encode_pool(cfg, vae_params, vae_config)
        unet_params, log["unet"] = train_mini_unet(cfg, latents, caption_index, contexts, progress,
                                                   shorter=shorter, run_dir=runs / "unet")
        _save(out / "unet.msgpack", unet_params)
    (out / "history.json").write_text(json.dumps(log, indent=1))

    config = StableDiffusionConfig(family="sd1", unet=cfg.unet_config(), vae=vae_config, text_encoder=text_config,
                                   prediction_type=PREDICTION, scheduler=dict(SCHEDULER), dtype="float16",
                                   source={"trained_by": "minidiff train-mini-sd", "settings": dataclasses.asdict(cfg)},
                                   guidance_scale=cfg.guidance, vocabulary=caption_words(cfg.dataset().shapes, cfg.dataset().colors),
                                   sampler=cfg.sampler, steps=cfg.sample_steps)
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": unused_tokens_zeroed(text_params, cfg)}
    half = jax.tree.map(lambda a: np.asarray(a, np.float16), params)
    save_clip_towers(clip_params, cfg, out / CLIP_FILE)
    return save_converted(half, config, out / "mini_sd.safetensors")[0]


CLIP_FILE = "mini_sd_clip.safetensors"  # the image tower and projections, next to the model (lesson 9)


def save_clip_towers(clip_params, cfg: MiniSDConfig, path) -> Path:
    """The parts of the contrastive CLIP that the pipeline does not need (image tower, text
    projection, temperature), float16, so that the lessons can redo CLIP's similarity matrix."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    rest = {k: v for k, v in clip_params.items() if k != "text_model"}
    flat = {k: np.ascontiguousarray(np.asarray(v, np.float16)).reshape(np.shape(v))
            for k, v in flatten_dict(rest, sep="/").items()}
    save_file(flat, str(path), metadata={"settings": json.dumps(dataclasses.asdict(cfg))})
    return Path(path)


def load_clip(model_path=None):
    """(ContrastiveCLIP module, its params) of a mini model: the text tower from the model file, the
    rest from ``mini_sd_clip.safetensors`` next to it (default: the built-in model)."""
    from flax.traverse_util import unflatten_dict
    from safetensors import safe_open

    from ..convert import load_converted
    from ..nn.clip import ContrastiveCLIP
    from ..pipeline import MINI_MODEL

    model_path = Path(model_path or MINI_MODEL)
    clip_path = model_path.with_name(CLIP_FILE)
    if not clip_path.is_file():
        raise ValueError(f"{clip_path} not found: the CLIP image tower is written by `minidiff train-mini-sd`")
    params, config = load_converted(model_path)
    with safe_open(str(clip_path), "np") as f:
        rest = unflatten_dict({k: f.get_tensor(k).astype(np.float32) for k in f.keys()}, sep="/")
        settings = json.loads(f.metadata()["settings"])
    text = jax.tree.map(lambda a: np.asarray(a, np.float32), params["text_encoder"])
    model = ContrastiveCLIP(config.text_encoder, embed_dim=settings["text_width"])
    return model, {**rest, "text_model": text}


def unused_tokens_zeroed(text_params, cfg: MiniSDConfig):
    """The text encoder with the token-embedding rows that no training caption uses set to zero.

    Those 49,000-odd rows never received a gradient (they are their random initialisation, so a word
    the model never saw means nothing either way); as zeros they cost nothing in git or a wheel,
    which store files compressed."""
    ids = CLIPTokenizer.from_bpe_gz()([*cfg.dataset(held_out=False).captions(), ""], CONTEXT_LENGTH)
    table = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
    keep = np.zeros(len(table), bool)
    keep[np.unique(ids)] = True
    zeroed = np.where(keep[:, None], table, 0).astype(table.dtype)
    embeddings = {**text_params["embeddings"], "token_embedding": {"embedding": zeroed}}
    return {**text_params, "embeddings": embeddings}


# --- measuring prompt following -------------------------------------------------------------------

def evaluate_prompt_following(pipe, cfg: MiniSDConfig | None = None, samples_per_prompt: int = 2, steps: int = 30,
                              guidance_scale: float = 7.5, seed: int = 0, batch: int = 108, sampler: str = "ddim",
                              sigmas: str | None = None) -> dict:
    """Fraction of pictures whose shape, colour and position the shapes classifier reads as the
    prompt's, over the fixed prompt list (every shape x colour x position, sizes alternating), and the
    same over the prompts whose (shape, colour) pair was held out of training.  sampler, sigmas: as
    the pipeline's (any name ``minidiff.diffusion.solvers.resolve`` reads; default DDIM)."""
    from .classifier import cached_classifier, evaluation_prompts, predict

    cfg = cfg or MiniSDConfig()
    ds = cfg.dataset(held_out=False)
    prompts, labels = evaluation_prompts(ds)
    images = []
    for r in range(samples_per_prompt):
        for i in range(0, len(prompts), batch):
            images.append(pipe(prompts[i:i + batch], steps=steps, guidance_scale=guidance_scale,
                               seed=seed + 1000 * r + i, height=cfg.image_size, width=cfg.image_size,
                               sampler=sampler, sigmas=sigmas))
    images = np.concatenate(images)
    labels = {k: np.tile(v, samples_per_prompt) for k, v in labels.items()}
    pred = predict(cached_classifier(ds), images)
    right = {a: pred[a] == labels[a] for a in ("shape", "color", "position")}
    joint = np.logical_and.reduce(list(right.values()))
    asked = [(ds.shapes[s], ds.colors[c]) for s, c in zip(labels["shape"], labels["color"])]  # (shape, colour) per sample
    pairs, held_out = set(asked), set(cfg.held_out)
    held = np.array([pair in held_out for pair in asked])
    out = {a: float(r.mean()) for a, r in right.items()}
    out.update(joint=float(joint.mean()), joint_held_out=float(joint[held].mean()) if held.any() else None,
               n=len(images), prompts=len(prompts), held_out_prompts=int(held.sum() // samples_per_prompt),
               pairs=len(pairs))
    return out, images


def guidance_figure(results: dict, path, columns: int = 8, cfg: MiniSDConfig | None = None) -> Path:
    """One row per guidance scale ({scale: (metrics, images)} from :func:`evaluate_prompt_following`,
    same seeds), the same prompts in the columns (the held-out pairs first), each row titled with its
    accuracies."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .classifier import evaluation_prompts

    cfg = cfg or MiniSDConfig()
    prompts, labels = evaluation_prompts(cfg.dataset(held_out=False))
    shapes, colors = cfg.dataset().shapes, cfg.dataset().colors
    held = [i for i in range(len(prompts)) if (shapes[labels["shape"][i]], colors[labels["color"][i]]) in cfg.held_out]
    seen = [i for i in range(len(prompts)) if i not in held]
    half = columns // 2
    chosen = held[::max(1, len(held) // half)][:half] + seen[::max(1, len(seen) // (columns - half))][:columns - half]
    fig, axes = plt.subplots(len(results), len(chosen), figsize=(1.6 * len(chosen), 1.9 * len(results) + 0.4),
                             squeeze=False)
    for row, (g, (metrics, images)) in zip(axes, results.items()):
        for ax, i in zip(row, chosen):
            ax.imshow(images[i], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if ax is row[0]:
                ax.set_ylabel(f"guidance {g:g}", fontsize=9)
        held_text = "" if metrics["joint_held_out"] is None else f", held-out pairs {metrics['joint_held_out']:.0%}"
        row[0].set_title(f"guidance {g:g}: all three right {metrics['joint']:.0%}{held_text}  (colour "
                         f"{metrics['color']:.0%}, shape {metrics['shape']:.0%}, position {metrics['position']:.0%})",
                         fontsize=9, loc="left")
    for ax, i in zip(axes[-1], chosen):
        ax.set_xlabel(("*" if i in held else "") + textwrap.fill(prompts[i].removeprefix("a "), 16), fontsize=7)
    fig.suptitle("the same seeds at each guidance scale (* = a (shape, colour) pair never seen in training)", fontsize=9)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
