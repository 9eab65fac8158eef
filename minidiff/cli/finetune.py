"""draw-subject, textual-inversion, dreambooth, lora, evaluate-finetune: teaching a model a subject."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..train.configs import DreamBoothConfig, LoRAConfig, TextualInversionConfig
from .common import FSDP_HELP, given, lora_argument, mesh, positive, print_metrics, write_history


def add(sub):
    d = sub.add_parser("draw-subject", help="draw a subject the built-in model never saw (pictures + captions), "
                                            "to fine-tune on")
    d.add_argument("kind", choices=("ring", "orange"), help="ring: one red ring at 4 places (DreamBooth's subject); "
                                                            "orange: orange shapes (a new colour word)")
    d.add_argument("--out", required=True, help="folder to write N.png + N.txt into")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=draw_subject)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("subject", help="folder of pictures, each with a caption file (0.png + 0.txt) that has {} "
                                        "where the new word goes: 'a {} circle in the top left'")
    common.add_argument("--caption", help="the caption for pictures without a .txt file, e.g. 'a photo of {}'")
    common.add_argument("--model", help="the model to teach (default: the built-in mini model)")
    common.add_argument("--out", required=True, help="output folder (a stopped run continues from its checkpoint)")
    common.add_argument("--seed", type=int)
    common.add_argument("--save-every", type=int, default=0, help="also save the result every N steps")
    common.add_argument("--no-samples", action="store_true", help="skip the sample grid at the end")
    common.add_argument("--no-progress", action="store_true")

    ti = TextualInversionConfig
    t = sub.add_parser("textual-inversion", parents=[common], help="learn one new word's embedding from a few "
                       "pictures (the model is unchanged; the result is a few KB)")
    t.add_argument("--token", help=f"the new word (default: {ti.token})")
    t.add_argument("--init-word", help=f"start from this word's embedding (default: {ti.init_word})")
    t.add_argument("--steps", type=int, help=f"(default: {ti.steps})")
    t.add_argument("--lr", type=float, help=f"(default: {ti.lr})")
    t.add_argument("--batch", type=int, help=f"(default: {ti.batch})")
    t.set_defaults(func=textual_inversion)

    db = DreamBoothConfig
    b = sub.add_parser("dreambooth", parents=[common], help="fine-tune the UNet on a few pictures of one subject, "
                       "with prior preservation (the result is a whole model)")
    b.add_argument("--identifier", help=f"the rare word naming the subject (default: {db.identifier})")
    b.add_argument("--steps", type=int, help=f"(default: {db.steps})")
    b.add_argument("--lr", type=float, help=f"(default: {db.lr})")
    b.add_argument("--batch", type=int, help=f"(default: {db.batch})")
    b.add_argument("--prior-weight", type=float, help=f"lambda (default: {db.prior_weight})")
    b.add_argument("--no-prior", action="store_true", help="no prior preservation (lambda = 0)")
    b.add_argument("--class-images", type=int, help=f"class pictures drawn per class prompt (default: {db.class_images})")
    b.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations in the "
                   "backward pass (less memory, more compute)")
    b.add_argument("--fsdp", type=positive, metavar="N", help=FSDP_HELP)
    b.set_defaults(func=dreambooth)

    lc = LoRAConfig
    lo = sub.add_parser("lora", parents=[common], help="train low-rank adapters of the UNet's attention (and "
                        "optionally the text encoder) on a few pictures of one subject (the result is a LoRA file "
                        "for --lora)")
    lo.add_argument("--identifier", help=f"the rare word naming the subject (default: {lc.identifier})")
    lo.add_argument("--rank", type=positive, help=f"r (default: {lc.rank})")
    lo.add_argument("--alpha", type=float, help="alpha; the update is (alpha / r) up @ down (default: r)")
    lo.add_argument("--text-encoder", action="store_true", help="also adapt the text encoder's attention projections")
    lo.add_argument("--steps", type=int, help=f"(default: {lc.steps})")
    lo.add_argument("--lr", type=float, help=f"(default: {lc.lr})")
    lo.add_argument("--batch", type=int, help=f"(default: {lc.batch})")
    lo.add_argument("--prior-weight", type=float, help=f"lambda (default: {lc.prior_weight})")
    lo.add_argument("--no-prior", action="store_true", help="no prior preservation (lambda = 0)")
    lo.add_argument("--class-images", type=int, help=f"class pictures drawn per class prompt (default: {lc.class_images})")
    lo.add_argument("--fsdp", type=positive, metavar="N", help=FSDP_HELP)
    lo.set_defaults(func=lora)

    e = sub.add_parser("evaluate-finetune", help="how often a fine-tuned word gives its subject, and (ring) whether "
                                                 "the class 'circle' kept its meaning")
    e.add_argument("kind", choices=("ring", "orange"))
    e.add_argument("--model", help="a model (default: the built-in one), e.g. a DreamBooth model.safetensors")
    e.add_argument("--embedding", action="append", help="a textual-inversion file to load first")
    e.add_argument("--lora", action="append", metavar="FILE[:SCALE]", type=lora_argument,
                   help="a LoRA file to fuse first (repeatable)")
    e.add_argument("--identifier", help="the word in the prompts (default: the embedding's token)")
    e.add_argument("--samples", type=int, default=2, help="pictures per prompt (default: %(default)s)")
    e.add_argument("--steps", type=int, default=30)
    e.add_argument("--guidance", type=float, default=7.5)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=evaluate_finetune)


def draw_subject(args):
    from ..train.finetune import draw_subject

    print(f"wrote {draw_subject(args.kind, seed=args.seed).save(args.out)} (pictures + captions with {{}} for the "
          "identifier)")


def _subject_grid(pipe, subject, identifier, path, meta, seed=0):
    """The subject's captions with the identifier, then the five positions it was never drawn at."""
    from ..data import POSITIONS
    from ..images import image_grid, save_image
    from ..train.finetune import Subject

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
    save_image(path, grid.repeat(k, 0).repeat(k, 1),
             {**meta, "rows": "the subject's pictures; then two seeds of: " + " | ".join(prompts), "seed": seed})
    return path


def _prior_weight(args):
    """lambda from --no-prior / --prior-weight (None: the config's default)."""
    if args.no_prior and args.prior_weight:
        raise ValueError("--no-prior and --prior-weight contradict each other")
    return 0.0 if args.no_prior else args.prior_weight


def _subject_and_out(args):
    """The subject folder read (pictures + captions) and the output folder made."""
    from ..train.finetune import load_subject

    subject = load_subject(args.subject, caption=args.caption)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return subject, out


def textual_inversion(args):
    cfg = TextualInversionConfig(**given(token=args.token, init_word=args.init_word, steps=args.steps, lr=args.lr,
                                         batch=args.batch, seed=args.seed))
    from ..embeddings import save_embedding
    from ..pipeline import load_pipeline
    from ..train.textual_inversion import train_textual_inversion

    subject, out = _subject_and_out(args)
    pipe = load_pipeline(args.model)
    meta = {"model": pipe.name, "subject": str(args.subject), "captions": subject.captions, **vars(cfg)}

    def checkpoint(step, vector):
        save_embedding(out / f"learned_embeds-{step}.safetensors", cfg.token, vector, {**meta, "step": step})

    vector, history = train_textual_inversion(pipe, subject, cfg, progress=not args.no_progress, checkpoint=checkpoint,
                                              checkpoint_every=args.save_every, run_dir=out / "run")
    path = save_embedding(out / "learned_embeds.safetensors", cfg.token, vector, {**meta, "step": cfg.steps})
    write_history(out, history, {"subject": str(args.subject)})
    print(f"wrote {path} ({path.stat().st_size:,} bytes; loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, "
          f"{history['seconds']:.0f} s)")
    if not args.no_samples:
        pipe.add_tokens({cfg.token: vector})
        grid = _subject_grid(pipe, subject, cfg.token, out / "samples.png", {"embedding": str(path), **meta})
        print(f"wrote {grid}")
    print(f'use it: minidiff txt2img "{subject.prompts(cfg.token)[0]}" --embedding {path}')


def dreambooth(args):
    cfg = DreamBoothConfig(**given(identifier=args.identifier, steps=args.steps, lr=args.lr, batch=args.batch,
                                   prior_weight=_prior_weight(args),
                                   class_images=args.class_images, remat=args.gradient_checkpointing or None,
                                   seed=args.seed))
    from dataclasses import replace

    import jax

    from ..convert import save_converted
    from ..pipeline import StableDiffusion, load_model
    from ..train.dreambooth import train_dreambooth

    subject, out = _subject_and_out(args)
    params, config, path = load_model(args.model)
    pipe = StableDiffusion.from_config(params, config, name=str(path))
    dtype = np.float16 if config.dtype == "float16" else np.float32
    source = {**config.source, "dreambooth": {"base": str(path), "subject": str(args.subject),
                                              "captions": subject.captions, **vars(cfg)}}

    def save(unet, name):
        tuned = {**params, "unet": jax.tree.map(lambda a: np.asarray(a, dtype), unet)}
        vocabulary = sorted({*config.vocabulary, *cfg.identifier.lower().split()}) if config.vocabulary else []
        return save_converted(tuned, replace(config, source=source, vocabulary=vocabulary), out / name)[0]

    unet, history = train_dreambooth(pipe, subject, cfg, progress=not args.no_progress,
                                     checkpoint=lambda step, p: save(p, f"model-{step}.safetensors"),
                                     checkpoint_every=args.save_every, run_dir=out / "run", mesh=mesh(args.fsdp))
    model = save(unet, "model.safetensors")
    write_history(out, history, {"subject": str(args.subject)})
    print(f"wrote {model} ({model.stat().st_size / 2**20:.1f} MB; loss {history['loss'][0]:.4f} -> "
          f"{history['loss'][-1]:.4f}, {history['seconds']:.0f} s)")
    if not args.no_samples:
        tuned = pipe.with_params(unet=unet)
        tuned.name = str(model)
        print(f"wrote {_subject_grid(tuned, subject, cfg.identifier, out / 'samples.png', {'model': str(model)})}")
    print(f'use it: minidiff txt2img "{subject.prompts(cfg.identifier)[0]}" --model {model}')


def lora(args):
    cfg = LoRAConfig(**given(identifier=args.identifier, rank=args.rank, alpha=args.alpha,
                             text_encoder=args.text_encoder or None, steps=args.steps, lr=args.lr, batch=args.batch,
                             prior_weight=_prior_weight(args), class_images=args.class_images,
                             seed=args.seed))
    import json

    from ..lora import save_lora
    from ..pipeline import load_pipeline
    from ..train.lora import lora_layers, train_lora

    subject, out = _subject_and_out(args)
    pipe = load_pipeline(args.model)
    factor = (cfg.alpha or cfg.rank) / cfg.rank
    meta = {"minidiff": json.dumps({"model": pipe.name, "subject": str(args.subject), "captions": subject.captions,
                                    **vars(cfg)})}

    def save(adapters, name):
        return save_lora(out / name, lora_layers(adapters, factor), meta)

    adapters, history = train_lora(pipe, subject, cfg, progress=not args.no_progress,
                                   checkpoint=lambda step, a: save(a, f"lora-{step}.safetensors"),
                                   checkpoint_every=args.save_every, run_dir=out / "run", mesh=mesh(args.fsdp))
    path = save(adapters, "lora.safetensors")
    write_history(out, history, {"subject": str(args.subject)})
    print(f"wrote {path} ({path.stat().st_size / 2**10:.0f} KB: {history['parameters']:,} numbers, rank {cfg.rank}; "
          f"loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}, {history['seconds']:.0f} s)")
    if not args.no_samples:
        pipe.load_lora(path)
        print(f"wrote {_subject_grid(pipe, subject, cfg.identifier, out / 'samples.png', {'lora': str(path)})}")
    print(f'use it: minidiff txt2img "{subject.prompts(cfg.identifier)[0]}" --lora {path}')


def evaluate_finetune(args):
    from ..pipeline import load_pipeline
    from ..train.finetune import evaluate_class, evaluate_subject

    pipe = load_pipeline(args.model)
    identifier = args.identifier
    for path in args.embedding or []:
        identifier = identifier or pipe.load_textual_inversion(path)[0]
    for path, scale in args.lora or []:
        print(f"LoRA {pipe.load_lora(path, scale)}")
    if identifier is None:
        raise ValueError("give --identifier (the word in the prompts, e.g. sks) or an --embedding")
    metrics, _ = evaluate_subject(pipe, args.kind, identifier, args.samples, args.steps, args.guidance, args.seed)
    print_metrics(f"{pipe.name}: prompts with {identifier!r} ({args.kind}), guidance {args.guidance}:", metrics)
    if args.kind == "ring":
        print_metrics("the class around it:", evaluate_class(pipe, args.samples, args.steps, args.guidance, args.seed))
