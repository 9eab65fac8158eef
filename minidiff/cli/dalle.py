"""train-vqvae, evaluate-vqvae, train-dalle, dalle, evaluate-dalle: VQ-VAE codes and the DALL-E-style transformer."""

from __future__ import annotations

from ..train.configs import DALLE_GUIDANCE as GUIDANCE
from ..train.configs import DalleTrainConfig, VQVAETrainConfig
from .common import default, fresh_run_dir, given, json_arg, print_metrics, resume_dir


def add(sub):
    vq = VQVAETrainConfig
    v = sub.add_parser("train-vqvae", help="train a VQ-VAE on the shapes; print held-out PSNR and codebook use")
    v.add_argument("--out", default="runs/vqvae", help="run folder (default: %(default)s)")
    v.add_argument("--steps", type=int, help=f"training steps (default: {vq.steps})")
    v.add_argument("--batch", type=int, help=f"batch size (default: {vq.batch})")
    v.add_argument("--lr", type=float, help=f"peak Adam learning rate (default: {vq.lr})")
    v.add_argument("--model-kwargs", help=f"JSON overrides of VQVAEConfig (default: {default(vq, 'model')})")
    v.add_argument("--foreground-weight", type=float,
                   help=f"shape pixels count 1 + this in the reconstruction error (default: {vq.foreground_weight})")
    v.add_argument("--reconstruction", choices=("l1", "l2"), help=f"reconstruction error (default: {vq.reconstruction})")
    v.add_argument("--restart-every", type=int, help=f"move unused codes every N steps, 0: never (default: "
                   f"{vq.restart_every}; DALL-E's dVAE, --model-kwargs '{{\"quantizer\": \"gumbel\"}}', needs 0)")
    v.add_argument("--adversarial-weight", type=float, help="VQGAN: weight of a patch discriminator's term (default: 0, none)")
    v.add_argument("--perceptual-weight", type=float, help="VQGAN: weight of the perceptual term (default: 0, none)")
    v.add_argument("--disc-start", type=int, help="VQGAN: the step from which the discriminator trains (default: 0)")
    v.add_argument("--seed", type=int)
    v.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings; --steps may grow)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=train_vqvae)

    g = sub.add_parser("evaluate-vqvae", help="held-out PSNR, codebook use, and the classifier on reconstructions")
    g.add_argument("--checkpoint", default="runs/vqvae")
    g.add_argument("--n", type=int, default=1000)
    g.set_defaults(func=evaluate_vqvae)

    dc = DalleTrainConfig
    t = sub.add_parser("train-dalle", help="train the DALL-E-style transformer on captions + VQ-VAE codes")
    t.add_argument("--vqvae", help=f"the VQ-VAE run folder (default: {dc.vqvae})")
    t.add_argument("--out", default="runs/dalle", help="run folder (default: %(default)s)")
    t.add_argument("--steps", type=int, help=f"training steps (default: {dc.steps})")
    t.add_argument("--batch", type=int, help=f"batch size (default: {dc.batch})")
    t.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default: {dc.lr})")
    t.add_argument("--cond-drop", type=float, help=f"probability of an empty caption (default: {dc.cond_drop})")
    t.add_argument("--attention", help="comma-separated per-layer masks, cycled: row, column, conv, causal "
                                       f"(default: {','.join(default(dc, 'model')['attention'])})")
    t.add_argument("--model-kwargs", help=f"JSON overrides of DalleConfig (default: {default(dc, 'model')})")
    t.add_argument("--guidance", type=float, help=f"guidance scale of the final evaluation (default: {GUIDANCE})")
    t.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", action="store_true", help="continue the run in --out (its saved settings; --steps may grow)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=train_dalle)

    g = sub.add_parser("dalle", help="draw a caption with a trained DALL-E-style model")
    g.add_argument("prompt", help='a caption, e.g. "a blue square in the bottom right"')
    g.add_argument("--checkpoint", default="runs/dalle", help="the train-dalle run folder (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--n", type=int, default=1, help="number of pictures (a grid when > 1)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, help="sample among the k most likely codes only")
    g.add_argument("--guidance", type=float, default=GUIDANCE,
                   help="classifier-free guidance on the logits (1: none; default: %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence at every token")
    g.add_argument("-o", "--output", default="dalle.png")
    g.set_defaults(func=dalle)

    g = sub.add_parser("evaluate-dalle", help="prompt following (shapes classifier) and sampling speed")
    g.add_argument("--checkpoint", default="runs/dalle")
    g.add_argument("--samples-per-prompt", type=int, default=2)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, nargs="+", default=[1.0], help="one or more (a table)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--guidance", type=float, nargs="+", default=[GUIDANCE],
                   help="one or more (a table; default: %(default)s)")
    g.add_argument("--no-size-word", action="store_true",
                   help='prompts without their size word ("a red circle in the top left")')
    g.set_defaults(func=evaluate_dalle)


def train_vqvae(args):
    if args.resume:
        from ..train.vqvae import VQVAETrainer, evaluate_vqvae

        trainer = VQVAETrainer.resume(resume_dir(args.out), steps=args.steps)
    else:
        out = fresh_run_dir(args.out)
        model = json_arg(args.model_kwargs, "--model-kwargs")
        config = VQVAETrainConfig(**given(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                                          foreground_weight=args.foreground_weight, reconstruction=args.reconstruction,
                                          restart_every=args.restart_every, adversarial_weight=args.adversarial_weight,
                                          perceptual_weight=args.perceptual_weight, disc_start=args.disc_start,
                                          model={**VQVAETrainConfig().model, **model} if model else None))
        from ..train.vqvae import VQVAETrainer, evaluate_vqvae

        trainer = VQVAETrainer(config, out)
    trainer.train(progress=not args.no_progress)
    print_metrics(f"{args.out} (step {trainer.step}), held-out images:",
                  evaluate_vqvae(trainer.model, trainer.variables(), trainer.config))


def evaluate_vqvae(args):
    from ..train.vqvae import evaluate_vqvae, load_vqvae

    model, variables, config = load_vqvae(args.checkpoint)
    print_metrics(f"{args.checkpoint}, {args.n} held-out images:", evaluate_vqvae(model, variables, config, args.n))


def train_dalle(args):
    if args.resume:
        from ..train.dalle import DalleTrainer, evaluate_dalle

        trainer = DalleTrainer.resume(resume_dir(args.out), steps=args.steps)
    else:
        out = fresh_run_dir(args.out)
        model = dict(DalleTrainConfig().model, **(json_arg(args.model_kwargs, "--model-kwargs") or {}))
        if args.attention:
            model["attention"] = args.attention.split(",")
        config = DalleTrainConfig(**given(vqvae=args.vqvae, steps=args.steps, batch=args.batch, lr=args.lr,
                                          cond_drop=args.cond_drop, seed=args.seed), model=model)
        from ..train.dalle import DalleTrainer, evaluate_dalle

        trainer = DalleTrainer(config, out)
    trainer.train(progress=not args.no_progress)
    if not args.no_eval:
        g = GUIDANCE if args.guidance is None else args.guidance
        print_metrics(f"{args.out} (step {trainer.step}), guidance {g}:",
                      evaluate_dalle(trainer.generator(), guidance_scale=g))


def dalle(args):
    from ..images import image_grid, save_image
    from ..train.dalle import load_dalle

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    generator = load_dalle(args.checkpoint)
    images = generator.generate([args.prompt] * args.n, seed=args.seed, temperature=args.temperature,
                                top_k=args.top_k, guidance_scale=args.guidance, use_cache=not args.no_cache)
    meta = {"prompt": args.prompt, "seed": args.seed, "n": args.n, "temperature": args.temperature,
            "top_k": args.top_k, "guidance_scale": args.guidance, "model": args.checkpoint}
    pixels = images[0] if args.n == 1 else image_grid(images, min(args.n, 8))
    print(f"wrote {save_image(args.output, pixels, meta)}")


def evaluate_dalle(args):
    from ..train.dalle import evaluate_dalle, load_dalle, sampling_speed

    generator = load_dalle(args.checkpoint)
    rows = []
    for temperature in args.temperature:
        for g in args.guidance:
            sampling = dict(temperature=temperature, top_k=args.top_k, guidance_scale=g)
            metrics = evaluate_dalle(generator, args.samples_per_prompt, args.seed, not args.no_size_word, **sampling)
            if not rows:
                metrics.update(sampling_speed(generator, **sampling))
            print_metrics(f"{args.checkpoint}, guidance {g}, temperature {temperature}, top-k {args.top_k}:", metrics)
            rows.append((g, temperature, metrics))
    if len(rows) > 1:
        print("guidance  temperature  position  colour  shape  all three")
        for g, temperature, m in rows:
            print(f"{g:8.3g}  {temperature:11.3g}  {m['accuracy_position']:8.1%}  {m['accuracy_color']:6.1%}  "
                  f"{m['accuracy_shape']:5.1%}  {m['accuracy_joint']:9.1%}")
