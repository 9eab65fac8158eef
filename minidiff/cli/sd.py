"""txt2img, convert, train-mini-sd, evaluate-mini-sd: Stable Diffusion and the built-in mini model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..diffusion.sigmas import SIGMA_KINDS
from ..diffusion.solvers import resolve
from ..train.configs import MiniSDConfig
from .common import finite, given, lora_argument, output_image, positive, print_metrics, seed


def add(sub):
    g = sub.add_parser("txt2img", help="Stable Diffusion: draw a prompt (or redraw --init-image) with a latent "
                                       "diffusion model", epilog=_samplers_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help='what to draw, e.g. "a green triangle in the top right" (the built-in model) or "a lighthouse at dusk" (SD)')
    g.add_argument("--model", help="a converted minidiff model (.safetensors + .json), a diffusers folder or a "
                                   "single-file checkpoint (.safetensors / .ckpt; converted on the fly). "
                                   "Default: the built-in mini model")
    g.add_argument("--negative", help="negative prompt: the unconditional branch of the guidance (default: empty)")
    g.add_argument("--steps", type=positive, help="sampling steps (default: the model's: 25 for Stable Diffusion, "
                                                  "6 for the built-in model)")
    g.add_argument("--guidance", type=finite, help="classifier-free guidance scale (default: the model's: 7.5 for "
                                                   "Stable Diffusion, 3 for the built-in model)")
    g.add_argument("--seed", type=seed, default=0, help="0 to 2**32 - 1 (default: %(default)s)")
    g.add_argument("--sampler", help="the sampler, by any name users know (default: the model's: 'DPM++ 2M Karras' for "
                                     "Stable Diffusion, 'Euler a' for the built-in model); the list is below")
    g.add_argument("--sigmas", choices=SIGMA_KINDS, help="the sigma grid of the ODE samplers (default: the sampler "
                                                         "name's, e.g. karras for 'DPM++ 2M Karras', else default)")
    g.add_argument("--eta", type=finite, default=0.0, help="DDIM's eta (0: deterministic)")
    g.add_argument("--height", type=positive, help="image height, a multiple of the model's size step "
                                                   "(default: the model's size, or the init image's)")
    g.add_argument("--width", type=positive, help="image width (as --height)")
    g.add_argument("--n", type=positive, default=1, help="number of images (a grid when > 1)")
    g.add_argument("--init-image", help="img2img (SDEdit): start from this picture, noised to --strength; "
                                        "resized to the image size")
    g.add_argument("--strength", type=finite, help="img2img: how much of the chain to run, in (0, 1] (default: 0.6)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype of the networks (default: bfloat16 on a GPU / TPU, float32 on CPU)")
    g.add_argument("--embedding", action="append", help="a textual-inversion embedding (.safetensors, from "
                   "`minidiff textual-inversion` or diffusers) whose word the prompt may use; repeatable")
    g.add_argument("--token", help="the word to use for a single --embedding (default: the file's own)")
    g.add_argument("--lora", action="append", metavar="FILE[:SCALE]", type=lora_argument,
                   help="a LoRA (.safetensors, kohya or diffusers / PEFT names) fused into the UNet and text "
                        "encoder with SCALE (default 1.0); repeatable")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-o", "--output", default="txt2img.png",
                   help="the image to write: .png, .jpg or .webp, the settings in its metadata (default: %(default)s)")
    g.set_defaults(func=txt2img)

    c = sub.add_parser("convert", help="convert a Stable Diffusion 1.x / 2.x checkpoint (diffusers folder, "
                                       ".safetensors or .ckpt) into minidiff's format")
    add_convert_arguments(c)
    c.set_defaults(func=convert)

    m = sub.add_parser("train-mini-sd", help="train the built-in mini Stable Diffusion on captioned shapes "
                                             "(VAE, contrastive CLIP, UNet)")
    m.add_argument("--out", default="runs/mini_sd", help="run folder; a rerun continues where it stopped")
    m.add_argument("--steps", type=int, help=f"UNet training steps (default: {MiniSDConfig.unet_steps})")
    m.add_argument("--seed", type=int)
    m.add_argument("--install", action="store_true", help="copy the result into minidiff/assets as the built-in model")
    m.add_argument("--guidance", type=float, default=7.5, help="guidance scale of the final evaluation")
    m.add_argument("--eval-steps", type=int, default=30, help="DDIM steps of the final evaluation")
    m.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=train_mini_sd)

    m = sub.add_parser("evaluate-mini-sd", help="prompt following of a text-to-image model on the shapes prompts")
    m.add_argument("--model", help="default: the built-in mini model")
    m.add_argument("--samples-per-prompt", type=int, default=2)
    m.add_argument("--steps", type=int, default=30)
    m.add_argument("--sampler", default="ddim", help="the sampler, by any name txt2img takes (default: %(default)s)")
    m.add_argument("--sigmas", choices=SIGMA_KINDS, help="the sigma grid of the ODE samplers (default: the sampler "
                                                         "name's, e.g. karras for 'DPM++ 2M Karras', else default)")
    m.add_argument("--guidance", type=float, nargs="+", default=[7.5], help="one or more scales (default: 7.5)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--figure", help="save a PNG: the same prompts and seeds at each guidance scale, with the accuracies")
    m.set_defaults(func=evaluate_mini_sd)


def _samplers_help() -> str:
    from ..diffusion.solvers import SOLVERS

    rows = [("ddim", "DDIM (Song et al. 2021), deterministic with --eta 0"), ("ddpm", "DDPM's ancestral chain")]
    rows += [(s.name, s.about) for s in SOLVERS.values()]
    return ("samplers (--sampler; also 'DPM++ 2M Karras', 'Euler a', dpmpp_2m, euler_ancestral, uni_pc, pndm...):\n"
            + "\n".join(f"  {name:13s} {about}" for name, about in rows))


def txt2img(args):
    from ..images import image_size

    # everything that can be checked without the model, before JAX loads
    out = output_image(args.output)
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength applies to img2img: give an --init-image too")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must lie in (0, 1], got {args.strength}")
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0, got {args.eta}")
    if args.token and len(args.embedding or []) != 1:
        raise ValueError("--token renames the word of a single --embedding file")
    init_size = image_size(args.init_image, f"--init-image {args.init_image}") if args.init_image else None
    for path, _ in args.lora or []:
        if not Path(path).is_file():
            raise ValueError(f"--lora {path}: no such file")
        if Path(path).suffix != ".safetensors":
            raise ValueError(f"--lora {path}: LoRAs are read from .safetensors files only (nothing is unpickled)")
    if args.sampler is not None:
        resolve(args.sampler, args.sigmas)  # a bad name is an error now
    if args.model is not None and not Path(args.model).exists():
        raise ValueError(f"--model {args.model}: no such file or folder (a converted .safetensors, a diffusers "
                         "folder or a single-file checkpoint)")

    from ..images import image_grid, load_image_at, save_image
    from ..pipeline import available_memory, dtype_name, load_pipeline

    dtype = dtype_name(args.dtype)
    pipe = load_pipeline(args.model)
    height, width = _image_size(pipe, args, init_size)
    need, free = pipe.memory_estimate(args.n, height, width, dtype), available_memory()
    if free is not None and need > free:
        one = pipe.memory_estimate(1, height, width, dtype)
        fits = max(0, int((free - one) // max(1, pipe.memory_estimate(2, height, width, dtype) - one)) + 1)
        raise ValueError(f"--n {args.n} at {width}x{height} needs about {need / 2**30:.1f} GiB (estimated) but "
                         f"{free / 2**30:.1f} GiB are free" + (f"; at most --n {fits} fits" if fits else
                                                               "; choose a smaller --width / --height"))
    init = None
    if args.init_image is not None:
        if init_size != (width, height):
            print(f"--init-image {args.init_image} ({init_size[0]}x{init_size[1]}) resized to {width}x{height}")
        init = load_image_at(args.init_image, width, height)
    added = []
    for path in args.embedding or []:
        added += pipe.load_textual_inversion(path, token=args.token if len(args.embedding) == 1 else None)
    for path, scale in args.lora or []:
        print(f"LoRA {pipe.load_lora(path, scale)}")
    guidance = pipe.guidance_scale if args.guidance is None else args.guidance
    sampler, sigmas = resolve(args.sampler or pipe.default_sampler, args.sigmas)
    steps = args.steps or pipe.default_steps
    strength = 0.6 if args.strength is None else args.strength
    images = pipe(args.prompt, negative_prompt=args.negative, steps=steps, guidance_scale=guidance,
                  seed=args.seed, sampler=sampler, sigmas=sigmas, eta=args.eta, height=height, width=width,
                  num_images_per_prompt=args.n, init_image=init, strength=strength, dtype=dtype,
                  progress=not args.no_progress)
    meta = {"prompt": args.prompt, "negative_prompt": args.negative or "", "seed": args.seed, "steps": steps,
            "guidance_scale": guidance, "sampler": sampler, "sigmas": sigmas, "eta": args.eta,
            "height": images.shape[1], "width": images.shape[2], "n": args.n, "dtype": dtype,
            "model": pipe.name}
    if init is not None:
        meta.update(init_image=args.init_image, strength=strength)
    if added:
        meta.update(embeddings=", ".join(args.embedding), added_tokens=" ".join(added))
    if pipe.loras:  # JSON: each file's name, the first 12 hex digits of its sha256, its scale
        meta.update(loras=json.dumps([{"file": d["file"], "sha256": d["sha256"][:12], "scale": d["scale"]}
                                      for d in pipe.loras]))
    pixels = images[0] if args.n == 1 else image_grid(images, min(args.n, 4))
    print(f"wrote {save_image(out, pixels, meta)}")


def _image_size(pipe, args, init_size) -> tuple[int, int]:
    """(height, width): as asked (multiples of the model's size step), else from the init image (its
    aspect, at most the model's size, rounded down to the step), else the model's size."""
    m = pipe.size_multiple
    for flag, v in (("--height", args.height), ("--width", args.width)):
        if v is not None and v % m:
            raise ValueError(f"{flag} must be a multiple of {m} for this model, got {v}")
    if init_size is None:
        return args.height or pipe.default_size, args.width or pipe.default_size
    w0, h0 = init_size
    if args.height and args.width:
        return args.height, args.width
    if args.height or args.width:  # the other side keeps the picture's aspect
        scale = (args.height / h0) if args.height else (args.width / w0)
    else:
        scale = min(1.0, pipe.default_size / max(w0, h0))
    rounded = lambda x: max(m, int(x * scale) // m * m)  # noqa: E731
    return args.height or rounded(h0), args.width or rounded(w0)


def add_convert_arguments(c: argparse.ArgumentParser):
    """The arguments of ``minidiff convert`` and of the top-level ``weights_convert.py``."""
    c.add_argument("src", help="a diffusers folder (unet/ vae/ text_encoder/ ...) or a single .safetensors / .ckpt "
                               "file in the original (ldm) layout")
    c.add_argument("dst", help="the converted weights, a .safetensors path (the config goes next to it, as .json)")
    c.add_argument("--config", choices=("sd1", "sd2", "sdxl"),
                   help="the model family (default: detected from the weights)")
    c.add_argument("--prediction", choices=("epsilon", "eps", "v_prediction", "v"),
                   help="what the UNet predicts (default: the folder's scheduler config; else epsilon for SD 1.x, "
                        "v for SD 2.x with a note: SD 2.x 512-px base models predict epsilon)")
    c.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="dtype of the converted weights (default: %(default)s)")
    c.add_argument("--no-ema", action="store_true", help="convert the raw UNet weights even if the file holds an EMA copy")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def convert(args):
    from ..convert import convert
    from .common import prediction

    print(convert(args.src, args.dst, config=args.config, prediction=prediction(args.prediction), dtype=args.dtype,
                  ema=False if args.no_ema else None, overwrite=args.overwrite))


def train_mini_sd(args):
    import shutil

    config = MiniSDConfig(**given(unet_steps=args.steps, seed=args.seed))
    from ..pipeline import MINI_MODEL, load_pipeline
    from ..train.mini_sd import CLIP_FILE, evaluate_prompt_following, train_mini_sd

    path = train_mini_sd(config, args.out, progress=not args.no_progress)
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    if args.install:
        for src, dst in ((path, MINI_MODEL), (path.with_suffix(".json"), MINI_MODEL.with_suffix(".json")),
                         (path.with_name(CLIP_FILE), MINI_MODEL.with_name(CLIP_FILE))):
            shutil.copyfile(src, dst)
        print(f"installed as the built-in model: {MINI_MODEL}")
    if not args.no_eval:
        metrics, _ = evaluate_prompt_following(load_pipeline(path), guidance_scale=args.guidance, steps=args.eval_steps)
        print_metrics(f"{path}, prompt following at guidance {args.guidance}, {args.eval_steps} DDIM steps:", metrics)


def evaluate_mini_sd(args):
    from ..pipeline import load_pipeline
    from ..train.mini_sd import evaluate_prompt_following, guidance_figure

    sampler, sigmas = resolve(args.sampler, args.sigmas)  # a bad name is an error before the model loads
    named = sampler.upper() if sampler in ("ddim", "ddpm") else sampler + ("" if sigmas == "default" else f" {sigmas}")
    pipe = load_pipeline(args.model)
    results = {}
    for g in args.guidance:
        metrics, images = evaluate_prompt_following(pipe, samples_per_prompt=args.samples_per_prompt, steps=args.steps,
                                                    guidance_scale=g, seed=args.seed, sampler=sampler, sigmas=sigmas)
        print_metrics(f"{pipe.name}, prompt following at guidance {g}, {args.steps} {named} steps:", metrics)
        results[g] = (metrics, images)
    if args.figure:
        print(f"wrote {guidance_figure(results, args.figure)}")
