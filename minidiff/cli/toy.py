"""demo, train, sample, evaluate: the toy diffusion models (2-D points, 32x32 shapes)."""

from __future__ import annotations

from pathlib import Path

from ..train.configs import DATA_DEFAULTS, DATASETS, TrainConfig
from .common import FSDP_HELP, json_arg, mesh, positive, prediction, resume_dir


def _per_data(name: str) -> str:
    """ "(default: X points, Y shapes)" from TrainConfig's per-data defaults."""
    points, shapes = DATA_DEFAULTS["points"].get(name, getattr(TrainConfig, name)), DATA_DEFAULTS["shapes"].get(name)
    return f"(default: {points} points, {shapes if shapes is not None else points} shapes)"


def add(sub):
    d = sub.add_parser("demo", help="noise a photo with the forward process; sample 2-D toy data with DDPM and DDIM")
    d.add_argument("-o", "--out", default="outputs/demo", help="output folder (default: %(default)s)")
    d.add_argument("--image", help="an image file to noise (default: scikit-image's 'chelsea' photograph)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="fewer samples and steps (seconds)")
    d.set_defaults(func=demo)

    t = sub.add_parser("train", help="train a diffusion model on toy data (2-D points or 32x32 shapes)")
    t.add_argument("--data", choices=DATASETS + ("mixture",), default=TrainConfig.data,
                   help="(default: %(default)s)")
    t.add_argument("--out", required=True, help="run folder: checkpoint.msgpack, config.json, samples/")
    t.add_argument("--steps", type=int, help="total training steps " + _per_data("steps"))
    t.add_argument("--batch", type=int, help="batch size " + _per_data("batch"))
    t.add_argument("--lr", type=float, help="peak AdamW learning rate " + _per_data("lr"))
    t.add_argument("--cond", choices=("none", "class"), help=f"class-conditional (shapes, gmm) "
                                                             f"(default: {TrainConfig.cond})")
    t.add_argument("--cond-drop", type=float, help="probability of dropping the class (classifier-free guidance) "
                                                   f"(default: {TrainConfig.cond_drop})")
    t.add_argument("--prediction", choices=("epsilon", "v_prediction", "sample", "eps", "v", "x0"),
                   help="what the network predicts " + _per_data("prediction"))
    t.add_argument("--schedule", help="beta schedule " + _per_data("schedule"))
    t.add_argument("--warmup", type=int, help="learning-rate warmup steps " + _per_data("warmup"))
    t.add_argument("--no-lr-decay", action="store_true", help="constant learning rate after the warmup "
                                                             "(default: cosine decay to lr/10 at the last step)")
    t.add_argument("--grad-clip", type=float, help=f"clip the gradient's global norm (default: {TrainConfig.grad_clip})")
    t.add_argument("--ema", type=float, help=f"EMA decay of the parameters (default: {TrainConfig.ema_decay})")
    t.add_argument("--min-snr-gamma", type=float, help="Min-SNR loss weighting with this gamma (default: none)")
    t.add_argument("--model-kwargs", help='JSON overrides of the model config, e.g. \'{"block_out_channels": [16, 32, 32]}\'')
    t.add_argument("--patch-size", type=int, help="shapes: the UNet sees PxP pixel patches as channels "
                                                  f"(default: {TrainConfig.patch_size})")
    t.add_argument("--latent", action="store_true", help="shapes: diffuse the built-in model's VAE latents (8x8x4) "
                                                         "instead of the pixels (latent diffusion)")
    t.add_argument("--class-conditioning", choices=("embedding", "tokens"),
                   help="shapes: the class as one embedding added to the time embedding, or as two "
                        f"cross-attention tokens, a shape word and a colour word (default: {TrainConfig.class_conditioning})")
    t.add_argument("--seed", type=int)
    t.add_argument("--sample-every", type=int, help="save a sample grid every N steps (0: never) " + _per_data("sample_every"))
    t.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps (0: at the end only) "
                   + _per_data("checkpoint_every"))
    t.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings; --steps may grow)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--fsdp", type=positive, metavar="N", help=FSDP_HELP)
    t.set_defaults(func=train)

    for name, func, text in (("sample", sample, "sample from a trained run: an image grid, or a scatter plot for 2-D data"),
                             ("evaluate", evaluate, "measure samples against the data (2-D: energy distance, MMD; "
                                                    "shapes: classifier accuracy on the requested class)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--checkpoint", required=True, help="a run folder (or its checkpoint.msgpack)")
        s.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
        s.add_argument("--steps", type=int, default=50, help="sampling steps (default: %(default)s)")
        s.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0: deterministic)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--guidance", type=float, help="classifier-free guidance scale (models trained with --cond-drop)")
        s.add_argument("--no-ema", action="store_true", help="use the raw parameters instead of their EMA")
        s.set_defaults(func=func)
        if name == "sample":
            s.add_argument("--class-label", help="class index (or name, e.g. 'red circle') for every sample")
            s.add_argument("--n", type=int, help="number of samples (default: 64 images, 2000 points)")
            s.add_argument("-o", "--output", default="samples.png", help="PNG to write (default: %(default)s)")
        else:
            s.add_argument("--n", type=int, help="number of samples (default: 5000 points, 100 per class of shapes)")


def demo(args):
    from .. import demo

    demo.run(args.out, image=args.image, quick=args.quick, seed=args.seed)


def train(args):
    from ..train.checkpoint import CHECKPOINT

    out = resume_dir(args.out) if args.resume else Path(args.out)
    if (out / CHECKPOINT).is_file():
        if not args.resume:
            raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
        from ..train.diffusion import Trainer

        trainer = Trainer.resume(out, steps=args.steps, mesh=mesh(args.fsdp))  # the saved config but the steps
        print(f"resuming {out} at step {trainer.step} of {trainer.config.steps}")
    else:
        config = TrainConfig.create(  # checks every setting before JAX is imported
            args.data, steps=args.steps, batch=args.batch, lr=args.lr, cond=args.cond,
            prediction=prediction(args.prediction), seed=args.seed, schedule=args.schedule, warmup=args.warmup,
            ema_decay=args.ema, cond_drop=args.cond_drop, sample_every=args.sample_every,
            checkpoint_every=args.checkpoint_every, model_kwargs=json_arg(args.model_kwargs, "--model-kwargs"),
            grad_clip=args.grad_clip, patch_size=args.patch_size, min_snr_gamma=args.min_snr_gamma,
            latent=True if args.latent else None, class_conditioning=args.class_conditioning,
            lr_decay=False if args.no_lr_decay else None)
        from ..train.diffusion import Trainer

        trainer = Trainer(config, out, mesh=mesh(args.fsdp))
    trainer.train(progress=not args.no_progress)
    print(f"step {trainer.step}: loss {trainer.history['loss'][-1]:.4f}; checkpoint in {out}")


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


def sample(args):
    from ..images import save_samples
    from ..train.diffusion import load_denoiser

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


def evaluate(args):
    from ..train.diffusion import evaluate, load_denoiser
    from .common import print_metrics

    den = load_denoiser(args.checkpoint, ema=not args.no_ema)
    print_metrics(f"{args.checkpoint} (step {den.step}, {den.config.data}), {args.sampler} {args.steps} steps, "
                  f"seed {args.seed}:", evaluate(den, args.n, args.sampler, args.steps, args.seed, args.eta, args.guidance))


