"""The ``minidiff`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # short names, at the CLI edge only


def _demo(args):
    from . import demo

    demo.run(args.out, image=args.image, quick=args.quick, seed=args.seed)


def _train(args):
    from .train.checkpoint import CHECKPOINT
    from .train.diffusion import Trainer, TrainConfig

    out = Path(args.out)
    if (out / CHECKPOINT).is_file():
        if not args.resume:
            raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        trainer = Trainer.resume(out, steps=args.steps)  # the saved config, except the number of steps
        print(f"resuming {out} at step {trainer.step} of {trainer.config.steps}")
    else:
        try:
            model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else None
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-kwargs is not valid JSON: {e}") from None
        config = TrainConfig.create(
            args.data, steps=args.steps, batch=args.batch, lr=args.lr, cond=args.cond, prediction=PREDICTION_ALIASES.get(args.prediction, args.prediction),
            seed=args.seed, schedule=args.schedule, warmup=args.warmup, ema_decay=args.ema, cond_drop=args.cond_drop,
            sample_every=args.sample_every, checkpoint_every=args.checkpoint_every, model_kwargs=model_kwargs,
            grad_clip=args.grad_clip, patch_size=args.patch_size, min_snr_gamma=args.min_snr_gamma,
            latent=True if args.latent else None, class_conditioning=args.class_conditioning,
            lr_decay=False if args.no_lr_decay else None,
        )
        trainer = Trainer(config, out)
    try:
        trainer.train(progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"minidiff train: interrupted at step {trainer.step}; continue with --resume", file=sys.stderr)
        raise SystemExit(130) from None
    h = trainer.history
    print(f"step {trainer.step}: loss {h['loss'][-1]:.4f}; checkpoint in {out}")


def _class_label(text, denoiser):
    """--class-label: an index, or a class name such as "red circle" (shapes)."""
    try:
        return int(text)
    except ValueError:
        if denoiser.config.data == "shapes" and denoiser.config.num_classes:
            ds = denoiser.config.dataset()
            names = [ds.class_name(i) for i in range(ds.num_classes)]
            if text in names:
                return names.index(text)
            raise ValueError(f"unknown class {text!r}; choose an index or one of: {', '.join(names)}") from None
        raise ValueError(f"--class-label must be an integer, got {text!r}") from None


def _sample(args):
    from .images import save_samples
    from .train.diffusion import load_denoiser

    den = load_denoiser(args.checkpoint, ema=not args.no_ema)
    label = None if args.class_label is None else _class_label(args.class_label, den)
    k = den.config.num_classes
    n = args.n or ((k * max(1, 64 // k) if k and label is None else 64) if den.config.data == "shapes" else 2000)
    x = den.sample(n, args.seed, args.sampler, args.steps, args.eta, class_labels=label, guidance_scale=args.guidance)
    meta = {"checkpoint": args.checkpoint, "training_step": den.step, "data": den.config.data, "sampler": args.sampler,
            "steps": args.steps, "eta": args.eta, "seed": args.seed, "n": n, "ema": not args.no_ema}
    if label is not None:
        meta["class_label"] = label
    if args.guidance is not None:
        meta["guidance_scale"] = args.guidance
    columns = k if (k and label is None and x.ndim == 4) else None
    print(f"wrote {save_samples(args.output, x, meta, columns=columns)}")


def _evaluate(args):
    from .train.diffusion import evaluate, load_denoiser

    den = load_denoiser(args.checkpoint, ema=not args.no_ema)
    print(f"{args.checkpoint} (step {den.step}, {den.config.data}), {args.sampler} {args.steps} steps, seed {args.seed}:")
    for key, value in evaluate(den, args.n, args.sampler, args.steps, args.seed, args.eta, args.guidance).items():
        print(f"  {key:30s} {value:.6g}" if isinstance(value, float) else f"  {key:30s} {value}")


def _json_arg(text, flag):
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON, e.g. '{{\"width\": 128}}': {e}") from None


def _fresh_run_dir(out) -> Path:
    from .train.checkpoint import CHECKPOINT

    out = Path(out)
    if (out / CHECKPOINT).is_file():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out (or delete it)")
    return out


def _print_metrics(title, metrics):
    print(title)
    for key, value in metrics.items():
        print(f"  {key:30s} {value:.6g}" if isinstance(value, float) else f"  {key:30s} {value}")


def _train_vqvae(args):
    from .train.vqvae import VQVAETrainConfig, VQVAETrainer, evaluate_vqvae

    out = _fresh_run_dir(args.out)
    overrides = {k: v for k, v in dict(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                       foreground_weight=args.foreground_weight,
                                       reconstruction=args.reconstruction).items() if v is not None}
    model = _json_arg(args.model_kwargs, "--model-kwargs")
    config = VQVAETrainConfig(**overrides, **({"model": {**VQVAETrainConfig().model, **model}} if model else {}))
    trainer = VQVAETrainer(config, out)
    trainer.train(progress=not args.no_progress)
    _print_metrics(f"{out} (step {trainer.step}), held-out images:",
                   evaluate_vqvae(trainer.model, trainer.variables(), config))


def _evaluate_vqvae(args):
    from .train.vqvae import evaluate_vqvae, load_vqvae

    model, variables, config = load_vqvae(args.checkpoint)
    _print_metrics(f"{args.checkpoint}, {args.n} held-out images:", evaluate_vqvae(model, variables, config, args.n))


def _train_dalle(args):
    from .train.dalle import GUIDANCE, DalleTrainConfig, DalleTrainer, evaluate_dalle

    out = _fresh_run_dir(args.out)
    overrides = {k: v for k, v in dict(vqvae=args.vqvae, steps=args.steps, batch=args.batch, lr=args.lr,
                                       cond_drop=args.cond_drop, seed=args.seed).items() if v is not None}
    model = dict(DalleTrainConfig().model, **(_json_arg(args.model_kwargs, "--model-kwargs") or {}))
    if args.attention:
        model["attention"] = args.attention.split(",")
    trainer = DalleTrainer(DalleTrainConfig(**overrides, model=model), out)
    trainer.train(progress=not args.no_progress)
    if not args.no_eval:
        g = GUIDANCE if args.guidance is None else args.guidance
        _print_metrics(f"{out} (step {trainer.step}), guidance {g}:", evaluate_dalle(trainer.generator(), guidance_scale=g))


def _dalle(args):
    from .images import save_png
    from .train.dalle import GUIDANCE, load_dalle
    from .images import image_grid

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    g = GUIDANCE if args.guidance is None else args.guidance
    generator = load_dalle(args.checkpoint)
    images = generator.generate([args.prompt] * args.n, seed=args.seed, temperature=args.temperature,
                                top_k=args.top_k, guidance_scale=g, use_cache=not args.no_cache)
    meta = {"prompt": args.prompt, "seed": args.seed, "n": args.n, "temperature": args.temperature,
            "top_k": args.top_k, "guidance_scale": g, "model": args.checkpoint}
    pixels = images[0] if args.n == 1 else image_grid(images, min(args.n, 8))
    print(f"wrote {save_png(args.output, pixels, meta)}")


def _evaluate_dalle(args):
    from .train.dalle import GUIDANCE, evaluate_dalle, load_dalle, sampling_speed

    generator = load_dalle(args.checkpoint)
    rows = []
    for temperature in args.temperature:
        for g in args.guidance or [GUIDANCE]:
            sampling = dict(temperature=temperature, top_k=args.top_k, guidance_scale=g)
            metrics = evaluate_dalle(generator, args.samples_per_prompt, args.seed, not args.no_size_word, **sampling)
            if not rows:
                metrics.update(sampling_speed(generator, **sampling))
            _print_metrics(f"{args.checkpoint}, guidance {g}, temperature {temperature}, top-k {args.top_k}:", metrics)
            rows.append((g, temperature, metrics))
    if len(rows) > 1:
        print("guidance  temperature  position  colour  shape  all three")
        for g, temperature, m in rows:
            print(f"{g:8.3g}  {temperature:11.3g}  {m['accuracy_position']:8.1%}  {m['accuracy_color']:6.1%}  "
                  f"{m['accuracy_shape']:5.1%}  {m['accuracy_joint']:9.1%}")


def add_convert_arguments(c: argparse.ArgumentParser):
    """The arguments of ``minidiff convert`` and of the top-level ``weights_convert.py``."""
    c.add_argument("src", help="a diffusers folder (unet/ vae/ text_encoder/ ...) or a single .safetensors / .ckpt "
                               "file in the original (ldm) layout")
    c.add_argument("dst", help="the converted weights, a .safetensors path (the config goes next to it, as .json)")
    c.add_argument("--config", choices=("sd1", "sd2"), help="the model family (default: detected from the weights)")
    c.add_argument("--prediction", choices=("epsilon", "eps", "v_prediction", "v"),
                   help="what the UNet predicts (default: the folder's scheduler config; else epsilon for SD 1.x, "
                        "v for SD 2.x with a note: SD 2.x 512-px base models predict epsilon)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the converted weights (default: float32)")
    c.add_argument("--no-ema", action="store_true", help="convert the raw UNet weights even if the file holds an EMA copy")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def _convert(args):
    from .weights import convert

    report = convert(args.src, args.dst, config=args.config, prediction=args.prediction, dtype=args.dtype,
                     ema=False if args.no_ema else None, overwrite=args.overwrite)
    print(report)


def _txt2img(args):
    from .images import load_image, save_png
    from .pipeline import dtype_name, load_pipeline
    from .images import image_grid

    # everything that can be checked before the (slow) model load
    if args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and (v <= 0 or v % 8):
            raise ValueError(f"{flag} must be a positive multiple of 8, got {v}")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength applies to img2img: give an --init-image too")
    strength = 0.6 if args.strength is None else args.strength
    if not 0 < strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {strength}")
    dtype = dtype_name(args.dtype)
    init = None
    if args.init_image is not None:
        init = load_image(args.init_image)  # ValueError when missing or unreadable
        if args.height or args.width:  # resize to the asked size (the other side keeps the image's)
            import numpy as np
            from PIL import Image

            size = (args.width or init.shape[1], args.height or init.shape[0])
            init = np.asarray(Image.fromarray(init).resize(size, Image.Resampling.LANCZOS))

    pipe = load_pipeline(args.model)
    added = []
    for path in args.embedding or []:
        added += pipe.load_textual_inversion(path, token=args.token if len(args.embedding) == 1 else None)
    if args.token and len(args.embedding or []) != 1:
        raise ValueError("--token renames the word of a single --embedding file")
    images = pipe(args.prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance,
                  seed=args.seed, sampler=args.sampler, eta=args.eta, height=args.height, width=args.width,
                  num_images_per_prompt=args.n, init_image=init, strength=strength, dtype=dtype,
                  progress=not args.no_progress)
    meta = {"prompt": args.prompt, "negative_prompt": args.negative or "", "seed": args.seed, "steps": args.steps,
            "guidance_scale": args.guidance, "sampler": args.sampler, "eta": args.eta,
            "height": images.shape[1], "width": images.shape[2], "n": args.n, "dtype": dtype,
            "model": pipe.name}
    if init is not None:
        meta.update(init_image=args.init_image, strength=strength)
    if added:
        meta.update(embeddings=", ".join(args.embedding), added_tokens=" ".join(added))
    pixels = images[0] if args.n == 1 else image_grid(images, min(args.n, 4))
    print(f"wrote {save_png(args.output, pixels, meta)}")


def _train_mini_sd(args):
    import shutil

    from .pipeline import MINI_MODEL, load_pipeline
    from .train.mini_sd import MiniSDConfig, evaluate_prompt_following, train_mini_sd

    overrides = {k: v for k, v in dict(unet_steps=args.steps, seed=args.seed).items() if v is not None}
    path = train_mini_sd(MiniSDConfig(**overrides), args.out, progress=not args.no_progress)
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    if args.install:
        from .train.mini_sd import CLIP_FILE

        for src, dst in ((path, MINI_MODEL), (path.with_suffix(".json"), MINI_MODEL.with_suffix(".json")),
                         (path.with_name(CLIP_FILE), MINI_MODEL.with_name(CLIP_FILE))):
            shutil.copyfile(src, dst)
        print(f"installed as the built-in model: {MINI_MODEL}")
    if not args.no_eval:
        metrics, _ = evaluate_prompt_following(load_pipeline(path), guidance_scale=args.guidance, steps=args.eval_steps)
        _print_metrics(f"{path}, prompt following at guidance {args.guidance}, {args.eval_steps} DDIM steps:", metrics)


def _evaluate_mini_sd(args):
    from .pipeline import load_pipeline
    from .train.mini_sd import evaluate_prompt_following, guidance_figure

    pipe = load_pipeline(args.model)
    results = {}
    for g in args.guidance:
        metrics, images = evaluate_prompt_following(pipe, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                                                    guidance_scale=g, seed=args.seed)
        _print_metrics(f"{pipe.name}, prompt following at guidance {g}, {args.steps} DDIM steps:", metrics)
        results[g] = (metrics, images)
    if args.figure:
        print(f"wrote {guidance_figure(results, args.figure)}")


# --- fine-tuning: textual inversion and DreamBooth ------------------------------------------------------

def _draw_subject(args):
    from .train.finetune import draw_subject

    print(f"wrote {draw_subject(args.kind, seed=args.seed).save(args.out)} (pictures + captions with {{}} for the "
          "identifier)")


def _subject_grid(pipe, subject, identifier, path, meta, seed=0):
    """The subject's captions with the identifier, then the five positions it was never drawn at."""
    from .data import POSITIONS
    from .images import save_png
    from .images import image_grid
    from .train.finetune import Subject

    seen = subject.prompts(identifier)
    try:  # the first caption at the places no picture showed
        unseen = [c for c in (Subject.fill(subject.placed(p), identifier) for p in POSITIONS) if c not in seen]
    except ValueError:  # captions without a place
        unseen = []
    prompts = seen + unseen
    images = pipe(prompts, seed=seed, num_images_per_prompt=2)
    rows = [images[0::2], images[1::2]]
    grid = image_grid(np.concatenate([subject.images, np.zeros_like(images[:len(prompts) - len(subject.images)]), *rows]),
                      len(prompts))
    k = max(1, 128 // subject.images.shape[1])  # small pictures: shown k times larger (nearest neighbour)
    save_png(path, grid.repeat(k, 0).repeat(k, 1),
             {**meta, "rows": "the subject's pictures; then two seeds of: " + " | ".join(prompts), "seed": seed})
    return path


def _given(**kwargs) -> dict:
    """The options given on the command line (the config's own defaults fill the rest)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _write_history(out: Path, history: dict, extra: dict):
    (out / "history.json").write_text(json.dumps({**history, **extra}, indent=1, default=str) + "\n", encoding="utf-8")


def _textual_inversion(args):
    from .pipeline import load_pipeline
    from .train.finetune import load_subject
    from .embeddings import save_embedding
    from .train.textual_inversion import TextualInversionConfig, train_textual_inversion

    subject = load_subject(args.subject, caption=args.caption)
    cfg = TextualInversionConfig(**_given(token=args.token, init_word=args.init_word, steps=args.steps, lr=args.lr,
                                          batch=args.batch, seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model)
    meta = {"model": pipe.name, "subject": str(args.subject), "captions": subject.captions, **vars(cfg)}

    def checkpoint(step, vector):
        save_embedding(out / f"learned_embeds-{step}.safetensors", cfg.token, vector, {**meta, "step": step})

    vector, history = train_textual_inversion(pipe, subject, cfg, progress=not args.no_progress,
                                              checkpoint=checkpoint, checkpoint_every=args.save_every)
    path = save_embedding(out / "learned_embeds.safetensors", cfg.token, vector, {**meta, "step": cfg.steps})
    _write_history(out, history, {"subject": str(args.subject)})
    print(f"wrote {path} ({path.stat().st_size:,} bytes; loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, "
          f"{history['seconds']:.0f} s)")
    if not args.no_samples:
        pipe.add_tokens({cfg.token: vector})
        grid = _subject_grid(pipe, subject, cfg.token, out / "samples.png", {"embedding": str(path), **meta})
        print(f"wrote {grid}")
    print(f'use it: minidiff txt2img "{subject.prompts(cfg.token)[0]}" --embedding {path}')


def _dreambooth(args):
    from dataclasses import replace

    import jax

    from .convert import save_converted
    from .pipeline import StableDiffusion, load_model
    from .train.dreambooth import DreamBoothConfig, train_dreambooth
    from .train.finetune import load_subject

    subject = load_subject(args.subject, caption=args.caption)
    if args.no_prior and args.prior_weight:
        raise ValueError("--no-prior and --prior-weight contradict each other")
    cfg = DreamBoothConfig(**_given(identifier=args.identifier, steps=args.steps, lr=args.lr, batch=args.batch,
                                    prior_weight=0.0 if args.no_prior else args.prior_weight,
                                    class_images=args.class_images, remat=args.gradient_checkpointing, seed=args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params, config, path = load_model(args.model)
    pipe = StableDiffusion.from_config(params, config, name=str(path))
    dtype = np.float16 if config.dtype == "float16" else np.float32
    source = {**config.source, "dreambooth": {"base": str(path), "subject": str(args.subject),
                                              "captions": subject.captions, **vars(cfg)}}

    def save(unet, name):
        tuned = {**params, "unet": jax.tree.map(lambda a: np.asarray(a, dtype), unet)}
        return save_converted(tuned, replace(config, source=source), out / name)[0]

    unet, history = train_dreambooth(pipe, subject, cfg, progress=not args.no_progress,
                                     checkpoint=lambda step, p: save(p, f"model-{step}.safetensors"),
                                     checkpoint_every=args.save_every)
    model = save(unet, "model.safetensors")
    _write_history(out, history, {"subject": str(args.subject)})
    print(f"wrote {model} ({model.stat().st_size / 2**20:.1f} MB; loss {history['loss'][0]:.4f} -> "
          f"{history['loss'][-1]:.4f}, {history['seconds']:.0f} s)")
    if not args.no_samples:
        tuned = pipe.with_params(unet=unet)
        tuned.name = str(model)
        print(f"wrote {_subject_grid(tuned, subject, cfg.identifier, out / 'samples.png', {'model': str(model)})}")
    print(f'use it: minidiff txt2img "{subject.prompts(cfg.identifier)[0]}" --model {model}')


def _evaluate_finetune(args):
    from .pipeline import load_pipeline
    from .train.finetune import evaluate_class, evaluate_subject

    pipe = load_pipeline(args.model)
    identifier = args.identifier
    for path in args.embedding or []:
        identifier = identifier or pipe.load_textual_inversion(path)[0]
    if identifier is None:
        raise ValueError("give --identifier (the word in the prompts, e.g. sks) or an --embedding")
    metrics, _ = evaluate_subject(pipe, args.kind, identifier, args.samples, args.steps, args.guidance, args.seed)
    _print_metrics(f"{pipe.name}: prompts with {identifier!r} ({args.kind}), guidance {args.guidance}:", metrics)
    if args.kind == "ring":
        _print_metrics("the class around it:", evaluate_class(pipe, args.samples, args.steps, args.guidance, args.seed))


def _add_finetune(sub):
    d = sub.add_parser("draw-subject", help="draw a subject the built-in model never saw (pictures + captions), "
                                            "to fine-tune on")
    d.add_argument("kind", choices=("ring", "orange"), help="ring: one red ring at 4 places (DreamBooth's subject); "
                                                            "orange: orange shapes (a new colour word)")
    d.add_argument("--out", required=True, help="folder to write N.png + N.txt into")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_draw_subject)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("subject", help="folder of pictures, each with a caption file (0.png + 0.txt) that has {} "
                                        "where the new word goes: 'a {} circle in the top left'")
    common.add_argument("--caption", help="the caption for pictures without a .txt file, e.g. 'a photo of {}'")
    common.add_argument("--model", help="the model to teach (default: the built-in mini model)")
    common.add_argument("--out", required=True, help="output folder")
    common.add_argument("--batch", type=int, default=None)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps")
    common.add_argument("--no-samples", action="store_true", help="skip the sample grid at the end")
    common.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("textual-inversion", parents=[common], help="learn one new word's embedding from a few "
                       "pictures (the model is unchanged; the result is a few KB)")
    t.add_argument("--token", help="the new word (default: <orange>)")
    t.add_argument("--init-word", help="start from this word's embedding (default: red)")
    t.add_argument("--steps", type=int, help="(default: 300)")
    t.add_argument("--lr", type=float, help="(default: 0.01)")
    t.set_defaults(func=_textual_inversion)

    b = sub.add_parser("dreambooth", parents=[common], help="fine-tune the UNet on a few pictures of one subject, "
                       "with prior preservation (the result is a whole model)")
    b.add_argument("--identifier", help="the rare word naming the subject (default: sks)")
    b.add_argument("--steps", type=int, help="(default: 300)")
    b.add_argument("--lr", type=float, help="(default: 1e-4)")
    b.add_argument("--prior-weight", type=float, help="lambda (default: 1)")
    b.add_argument("--no-prior", action="store_true", help="no prior preservation (lambda = 0)")
    b.add_argument("--class-images", type=int, help="class pictures drawn per class prompt (default: 8)")
    b.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in the "
                   "backward pass (less memory, about a third more compute)")
    b.set_defaults(func=_dreambooth)

    e = sub.add_parser("evaluate-finetune", help="how often a fine-tuned word gives its subject, and (ring) whether "
                                                 "the class 'circle' kept its meaning")
    e.add_argument("kind", choices=("ring", "orange"))
    e.add_argument("--model", help="a model (default: the built-in one), e.g. a DreamBooth model.safetensors")
    e.add_argument("--embedding", action="append", help="a textual-inversion file to load first")
    e.add_argument("--identifier", help="the word in the prompts (default: the embedding's token)")
    e.add_argument("--samples", type=int, default=2, help="pictures per prompt (default: 2)")
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_evaluate_finetune)


def _add_txt2img(sub):
    g = sub.add_parser("txt2img", help="Stable Diffusion: draw a prompt (or redraw --init-image) with a latent "
                                       "diffusion model")
    g.add_argument("prompt", help='what to draw, e.g. "a red circle above a blue square"')
    g.add_argument("--model", help="a converted minidiff model (.safetensors + .json), a diffusers folder or a "
                                   "single-file checkpoint (.safetensors / .ckpt; converted on the fly). "
                                   "Default: the built-in mini model")
    g.add_argument("--negative", help="negative prompt: the unconditional branch of the guidance (default: empty)")
    g.add_argument("--steps", type=int, default=30, help="sampling steps (default: 30)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    g.add_argument("--height", type=int, help="image height, a multiple of 8 and of the model's factor "
                                              "(default: the model's size, or the init image's)")
    g.add_argument("--width", type=int, help="image width (as --height)")
    g.add_argument("--n", type=int, default=1, help="number of images (a grid when > 1)")
    g.add_argument("--init-image", help="img2img (SDEdit): start from this picture, noised to --strength")
    g.add_argument("--strength", type=float, help="img2img: how much of the chain to run, in (0, 1] (default: 0.6)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the networks (bfloat16: GPU/TPU)")
    g.add_argument("--embedding", action="append", help="a textual-inversion embedding (.safetensors, from "
                   "`minidiff textual-inversion` or diffusers) whose word the prompt may use; repeatable")
    g.add_argument("--token", help="the word to use for a single --embedding (default: the file's own)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-o", "--output", default="txt2img.png", help="PNG to write (default: txt2img.png)")
    g.set_defaults(func=_txt2img)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minidiff", description="Image generation from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="noise a photo with the forward process; sample 2-D toy data with DDPM and DDIM")
    d.add_argument("-o", "--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    d.add_argument("--image", help="an image file to noise (default: scikit-image's 'chelsea' photograph)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (seconds)")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="train a diffusion model on toy data (2-D points or 32x32 shapes)")
    t.add_argument("--data", choices=("shapes", "gmm", "mixture", "moons", "swissroll"), default="moons")
    t.add_argument("--out", required=True, help="run folder: checkpoint.msgpack, config.json, samples/")
    t.add_argument("--steps", type=int, help="total training steps (default: 10000 points, 2000 shapes)")
    t.add_argument("--batch", type=int, help="batch size (default: 512 points, 32 shapes)")
    t.add_argument("--lr", type=float, help="peak AdamW learning rate (default: 1e-3 points, 2e-3 shapes)")
    t.add_argument("--cond", choices=("none", "class"), default="none", help="class-conditional (shapes, gmm)")
    t.add_argument("--cond-drop", type=float, help="probability of dropping the class (classifier-free guidance)")
    t.add_argument("--prediction", choices=("eps", "v", "epsilon", "v_prediction"), help="predict the noise or v (default: eps points, v shapes)")
    t.add_argument("--schedule", choices=("linear", "scaled_linear", "cosine"),
                   help="beta schedule (default: linear points, cosine shapes)")
    t.add_argument("--warmup", type=int, help="learning-rate warmup steps (default: 200 points, 100 shapes)")
    t.add_argument("--no-lr-decay", action="store_true", help="constant learning rate after the warmup "
                                                             "(default: cosine decay to lr/10 at the last step)")
    t.add_argument("--grad-clip", type=float, help="clip the gradient's global norm (default: 1.0)")
    t.add_argument("--ema", type=float, help="EMA decay of the parameters (default: 0.999)")
    t.add_argument("--min-snr-gamma", type=float, help="Min-SNR loss weighting with this gamma (default: none)")
    t.add_argument("--model-kwargs", help='JSON overrides of the model config, e.g. \'{"block_out_channels": [16, 32, 32]}\'')
    t.add_argument("--patch-size", type=int, help="shapes: the UNet sees PxP pixel patches as channels (default: 1)")
    t.add_argument("--latent", action="store_true", help="shapes: diffuse the built-in model's VAE latents (8x8x4) "
                                                         "instead of the pixels (latent diffusion)")
    t.add_argument("--class-conditioning", choices=("embedding", "tokens"),
                   help="shapes: the class as one embedding added to the time embedding (default), or as two "
                        "cross-attention tokens, a shape word and a colour word")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--sample-every", type=int, help="save a sample grid every N steps (0: never)")
    t.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps (0: at the end only)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings; --steps may grow)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="sample from a trained run: an image grid, or a scatter plot for 2-D data")
    s.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
    s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    s.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--class-label", help="class index (or name, e.g. 'red circle') for every sample")
    s.add_argument("--n", type=int, help="number of samples (default: 64 images, 2000 points)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (models trained with --cond-drop)")
    s.add_argument("--no-ema", action="store_true", help="use the raw parameters instead of their EMA")
    s.add_argument("-o", "--output", default="samples.png", help="PNG to write (default: samples.png)")
    s.set_defaults(func=_sample)

    e = sub.add_parser("evaluate", help="measure samples against the data (2-D: energy distance, MMD; "
                                        "shapes: classifier accuracy on the requested class)")
    e.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
    e.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    e.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    e.add_argument("--eta", type=float, default=0.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n", type=int, help="number of samples (default: 5000 points, 100 per class of shapes)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    e.add_argument("--no-ema", action="store_true", help="use the raw parameters instead of their EMA")
    e.set_defaults(func=_evaluate)

    v = sub.add_parser("train-vqvae", help="train a VQ-VAE on the shapes; print held-out PSNR and codebook use")
    v.add_argument("--out", default="runs/vqvae", help="run folder (default: runs/vqvae)")
    v.add_argument("--steps", type=int, help="training steps (default: 3000)")
    v.add_argument("--batch", type=int, help="batch size (default: 32)")
    v.add_argument("--lr", type=float, help="peak Adam learning rate (default: 2e-3)")
    v.add_argument("--model-kwargs", help='JSON overrides of VQVAEConfig, e.g. \'{"num_codes": 256}\'')
    v.add_argument("--foreground-weight", type=float,
                   help="shape pixels count 1 + this in the reconstruction error (default: 10)")
    v.add_argument("--reconstruction", choices=("l1", "l2"), help="reconstruction error (default: l1)")
    v.add_argument("--seed", type=int)
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_train_vqvae)

    g = sub.add_parser("evaluate-vqvae", help="held-out PSNR, codebook use, and the classifier on reconstructions")
    g.add_argument("--checkpoint", default="runs/vqvae")
    g.add_argument("--n", type=int, default=1000)
    g.set_defaults(func=_evaluate_vqvae)

    t = sub.add_parser("train-dalle", help="train the DALL-E-style transformer on captions + VQ-VAE codes")
    t.add_argument("--vqvae", default="runs/vqvae", help="the VQ-VAE run folder (default: runs/vqvae)")
    t.add_argument("--out", default="runs/dalle", help="run folder (default: runs/dalle)")
    t.add_argument("--steps", type=int, help="training steps (default: 3000)")
    t.add_argument("--batch", type=int, help="batch size (default: 64)")
    t.add_argument("--lr", type=float, help="peak AdamW learning rate (default: 1e-3)")
    t.add_argument("--cond-drop", type=float, help="probability of an empty caption (default: 0.1)")
    t.add_argument("--attention", help="comma-separated per-layer masks, cycled: row, column, conv, causal "
                                       "(default: row,column)")
    t.add_argument("--model-kwargs", help='JSON overrides of DalleConfig, e.g. \'{"width": 192, "layers": 6}\'')
    t.add_argument("--guidance", type=float, help="guidance scale of the final evaluation (default: 2)")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    t.add_argument("--seed", type=int)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train_dalle)

    g = sub.add_parser("dalle", help="draw a caption with a trained DALL-E-style model")
    g.add_argument("prompt", help='a caption, e.g. "a blue square in the bottom right"')
    g.add_argument("--checkpoint", default="runs/dalle", help="the train-dalle run folder (default: runs/dalle)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="number of pictures (a grid when > 1)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, help="sample among the k most likely codes only")
    g.add_argument("--guidance", type=float, help="classifier-free guidance on the logits (1: none; default: 2)")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every token")
    g.add_argument("-o", "--output", default="dalle.png")
    g.set_defaults(func=_dalle)

    g = sub.add_parser("evaluate-dalle", help="prompt following (shapes classifier) and sampling speed")
    g.add_argument("--checkpoint", default="runs/dalle")
    g.add_argument("--samples-per-prompt", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="one or more (a table)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--guidance", type=float, nargs="+", help="one or more (a table; default: 2)")
    g.add_argument("--no-size-word", action="store_true",
                   help='prompts without their size word ("a red circle in the top left")')
    g.set_defaults(func=_evaluate_dalle)
    _add_txt2img(sub)
    _add_finetune(sub)

    m = sub.add_parser("train-mini-sd", help="train the built-in mini Stable Diffusion on captioned shapes "
                                             "(VAE, contrastive CLIP, UNet)")
    m.add_argument("--out", default="runs/mini_sd", help="run folder; a rerun continues at the unfinished stage")
    m.add_argument("--steps", type=int, help="UNet training steps (default: MiniSDConfig.unet_steps)")
    m.add_argument("--seed", type=int)
    m.add_argument("--install", action="store_true", help="copy the result into minidiff/assets as the built-in model")
    m.add_argument("--guidance", type=float, default=7.5, help="guidance scale of the final evaluation")
    m.add_argument("--eval-steps", type=int, default=30, help="DDIM steps of the final evaluation")
    m.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_train_mini_sd)

    m = sub.add_parser("evaluate-mini-sd", help="prompt following of a text-to-image model on the shapes prompts")
    m.add_argument("--model", help="default: the built-in mini model")
    m.add_argument("--samples-per-prompt", type=int, default=2)
    m.add_argument("--steps", type=int, default=30)
    m.add_argument("--guidance", type=float, nargs="+", default=[7.5], help="one or more scales (default: 7.5)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--figure", help="save a PNG: the same prompts and seeds at each guidance scale, with the accuracies")
    m.set_defaults(func=_evaluate_mini_sd)

    c = sub.add_parser("convert", help="convert a Stable Diffusion 1.x / 2.x checkpoint (diffusers folder, "
                                       ".safetensors or .ckpt) into minidiff's format")
    add_convert_arguments(c)
    c.set_defaults(func=_convert)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"minidiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
