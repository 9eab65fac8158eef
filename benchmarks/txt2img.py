"""Full Stable Diffusion 1.5-size text-to-image sampling with random weights: minidiff's pipeline next
to diffusers' StableDiffusionPipeline, on the same CPU, in one run.

    python benchmarks/txt2img.py [--sizes 256 512] [--steps 3] [--guidance 7.5] [--sampler ddim]
                                 [--plot docs/figures/txt2img_benchmark.png]

One prompt, guidance on (so the UNet runs on a batch of 2), DDIM or another sampler (``--sampler``:
"ddim", "DPM++ 2M Karras", "UniPC Karras", "Euler a": diffusers runs the matching scheduler).  Each implementation runs in its
own subprocess (its peak RSS is its own).  minidiff: the first call compiles and runs, the second
only runs (compile = first - second); diffusers: one warm-up call, then the timed call.  Printed:
seconds per step (the whole call / steps: text encoding and VAE decoding included), total seconds,
compile seconds, peak RSS, and the ratio minidiff / diffusers.  The table is also saved as a plot.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

PROMPT = "a red circle above a blue square"


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_tree(template, rng, dtype="float32"):
    """Random weights (float32 unless ``dtype`` says otherwise) in the shapes of a Flax parameter
    template (no init to compile)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.dtype(dtype)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        if name == "kernel":
            return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(dtype)
        if name == "scale":
            return np.ones(leaf.shape, dtype)
        if name == "embedding":
            return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(dtype)
        return np.zeros(leaf.shape, dtype)

    return jax.tree_util.tree_map_with_path(draw, template)


def diffusers_scheduler(sampler):
    """The diffusers scheduler that runs what minidiff's ``sampler`` names, with SD 1.5's schedule."""
    import diffusers

    from minidiff.diffusion.solvers import resolve

    name, sigmas = resolve(sampler)
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
              timestep_spacing="leading")
    karras = dict(use_karras_sigmas=sigmas == "karras")
    make = {"ddim": lambda: diffusers.DDIMScheduler(**sd, set_alpha_to_one=False, clip_sample=False),
            "euler": lambda: diffusers.EulerDiscreteScheduler(**sd, **karras),
            "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler(**sd),
            "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(**sd, **karras, algorithm_type="dpmsolver++"),
            "unipc": lambda: diffusers.UniPCMultistepScheduler(**sd, **karras)}
    if name not in make or (sigmas != "default" and name in ("ddim", "euler_a")):
        raise SystemExit(f"this benchmark has no diffusers scheduler for {sampler!r}")
    return make[name]()


MODEL_FILE = "/tmp/minidiff-bench/sd15_random.safetensors"


def minidiff_pipeline(from_file: bool = True):
    """minidiff's StableDiffusion with SD 1.5's architecture and random weights (no init to compile).
    ``from_file``: as a user runs a converted model: written once to MODEL_FILE (as ``minidiff convert``
    writes one), then loaded from it (memory-mapped; on a CPU the device uses the mapped weights)."""
    from pathlib import Path

    if from_file:
        from minidiff.pipeline import load_pipeline

        if not Path(MODEL_FILE).is_file():
            from minidiff.convert import save_converted
            from minidiff.sdconfig import StableDiffusionConfig

            pipe = minidiff_pipeline(from_file=False)
            Path(MODEL_FILE).parent.mkdir(parents=True, exist_ok=True)
            save_converted(pipe.params, StableDiffusionConfig(family="sd1", unet=pipe.unet_config, vae=pipe.vae_config,
                                                              text_encoder=pipe.text_config), MODEL_FILE)
            del pipe
        return load_pipeline(MODEL_FILE)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel
    from minidiff.nn.unet import UNet2DCondition, UNetConfig
    from minidiff.pipeline import StableDiffusion

    unet_cfg, vae_cfg, text_cfg = UNetConfig.sd15(), AutoencoderKLConfig.sd(), CLIPTextConfig.sd15()
    k = jax.random.key(0)
    shapes = lambda m, *a: jax.eval_shape(lambda: m.init(k, *a))["params"]  # noqa: E731
    rng = np.random.default_rng(0)
    params = {"unet": random_tree(shapes(UNet2DCondition(unet_cfg), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1, jnp.int32),
                                         jnp.zeros((1, 77, 768))), rng),
              "vae": random_tree(shapes(AutoencoderKL(vae_cfg), jnp.zeros((1, 16, 16, 3))), rng),
              "text_encoder": random_tree(shapes(CLIPTextModel(text_cfg), jnp.zeros((1, 77), jnp.int32)), rng)}
    # the pipeline's are then the only references: placing them frees the host arrays as it goes
    return StableDiffusion(unet_cfg, vae_cfg, text_cfg, params)


def diffusers_pipeline(sampler="ddim", device="cpu", dtype=None):
    """diffusers' StableDiffusionPipeline with SD 1.5's architecture and random weights, and its text
    tower (run outside the pipeline, on our token ids: no tokenizer files needed)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()  # SD 1.x defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=49407)).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                   scheduler=diffusers_scheduler(sampler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype) if dtype else pipe.to(device), text.to(device=device, dtype=dtype)


def run_minidiff(size, steps, guidance, sampler="ddim"):
    pipe = minidiff_pipeline()
    kw = dict(steps=steps, guidance_scale=guidance, height=size, width=size, sampler=sampler)
    t0 = time.perf_counter()
    pipe([PROMPT], seed=0, **kw)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe([PROMPT], seed=1, **kw)
    total = time.perf_counter() - t0
    return dict(total=total, per_step=total / steps, compile=max(first - total, 0.0))


def run_diffusers(size, steps, guidance, sampler="ddim"):
    import numpy as np
    import torch

    from minidiff.tokenizer import CLIPTokenizer

    pipe, text = diffusers_pipeline(sampler)
    ids = CLIPTokenizer.from_bpe_gz()([PROMPT, ""])

    def call():  # the text tower runs inside the timed call, as in minidiff's
        with torch.inference_mode():
            embeds = text(torch.from_numpy(np.asarray(ids)).long())[0]
            return pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], num_inference_steps=steps,
                        guidance_scale=guidance, height=size, width=size, output_type="np").images

    call()  # warm-up
    t0 = time.perf_counter()
    call()
    total = time.perf_counter() - t0
    return dict(total=total, per_step=total / steps, compile=0.0, threads=torch.get_num_threads())


def child(args):
    run = run_minidiff if args.impl == "minidiff" else run_diffusers
    r = run(args.size, args.steps, args.guidance, args.sampler)
    r["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(r))


def measure(impl, size, steps, guidance, sampler="ddim"):
    """One implementation's timings in a fresh subprocess (its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--impl", impl, "--size", str(size), "--steps", str(steps),
           "--guidance", str(guidance), "--sampler", sampler]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{impl} at {size} ({sampler}) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--plot", default="docs/figures/txt2img_benchmark.png")
    ap.add_argument("--impl", choices=["minidiff", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        return child(args)

    print(f"SD 1.5-size txt2img, random weights, 1 prompt, guidance {args.guidance} (UNet batch 2), "
          f"{args.sampler} {args.steps} steps, fp32, CPU")
    print(f"{'size':>7s} {'impl':>9s} {'s/step':>8s} {'total s':>8s} {'compile s':>10s} {'peak RSS':>10s}")
    rows = []
    for size in args.sizes:
        res = {}
        for impl in ("minidiff", "diffusers"):
            r = res[impl] = measure(impl, size, args.steps, args.guidance, args.sampler)
            print(f"{size:>5d}^2 {impl:>9s} {r['per_step']:8.2f} {r['total']:8.1f} {r['compile']:10.1f} "
                  f"{r['peak_rss_mib']:6.0f} MiB", flush=True)
        ratio = res["minidiff"]["per_step"] / res["diffusers"]["per_step"]
        print(f"{'':>7s} {'ratio':>9s} {ratio:8.2f}  (minidiff / diffusers, seconds per step)")
        rows.append((size, res))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for i, (size, res) in enumerate(rows):
        for j, impl in enumerate(("minidiff", "diffusers")):
            kw = dict(color=f"C{j}", label=impl if i == 0 else None)
            axes[0].bar(i + 0.4 * j - 0.2, res[impl]["per_step"], 0.4, **kw)
            axes[1].bar(i + 0.4 * j - 0.2, res[impl]["peak_rss_mib"] / 1024, 0.4, **kw)
    for ax, label in zip(axes, ("seconds per step (guided, batch 2)", "peak RSS (GiB)")):
        ax.set_xticks(range(len(rows)), [f"{s}x{s}" for s, _ in rows])
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"SD 1.5-size txt2img on this CPU, {args.sampler}, {args.steps} steps, random weights")
    fig.savefig(args.plot, dpi=100, bbox_inches="tight")
    print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
