"""SDXL base 1.0's full architecture with random weights: one 1024 x 1024 text-to-image call on this
machine's CPU, float32, weights held once.

    python benchmarks/sdxl_cpu.py [--size 1024] [--steps 2] [--guidance 5]

Random weights (kernels N(0, 1/fan_in), norms 1, biases 0: no init to compile) in the shapes of
``UNetConfig.sdxl()``, ``CLIPTextConfig.sdxl_l()`` / ``sdxl_g()`` and SD's VAE (3,468,837,867
parameters, 13.9 GB in float32).  Printed: the seconds of the first call (compiles), of the text
encoding, of each denoising step and of the VAE decode in a second call, and the peak RSS.  A real
SDXL run takes 30 steps: total ~ text + 30 x step + decode.

Measured on the 2-core, 24 GB build machine.  2026-12-03, ``--dtype bfloat16`` (weights held once, in
bfloat16: 6.8 GiB): one 1024 x 1024 image with 2 Euler steps, guided, completes in 308 s including
compilation (steps of 98 s with compiling and ~130-160 s, then the float32 VAE decode) at a peak RSS of
20.0 GiB (``/usr/bin/time``: 21.0 GB maximum resident).  A 30-step image: ~70 minutes.  The ~13 GB
beyond the weights: XLA's CPU backend computes the bfloat16 convolutions and matmuls in float32 and
converts their weights to float32 buffers as it goes.
2026-12-02, float32 (13.3 GiB of weights): the first 1024 x 1024 call grew past 21 GiB RSS before its
first step finished and was stopped so as not to exhaust the (shared) machine.  At ``--size 512``:
28 s per guided step.
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from txt2img import random_tree

from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig
from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel
from minidiff.nn.unet import UNet2DCondition, UNetConfig
from minidiff.pipeline import StableDiffusion


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sdxl_pipeline(dtype="float32"):
    unet_cfg, vae_cfg = UNetConfig.sdxl(), AutoencoderKLConfig.sd(sample_size=1024, scaling_factor=0.13025)
    text_cfg, text_cfg_2 = CLIPTextConfig.sdxl_l(), CLIPTextConfig.sdxl_g()
    k, rng = jax.random.key(0), np.random.default_rng(0)
    shapes = lambda m, *a, **kw: jax.eval_shape(lambda: m.init(k, *a, **kw))["params"]  # noqa: E731
    ids = jnp.zeros((1, 77), jnp.int32)
    added = {"text_embeds": jnp.zeros((1, 1280)), "time_ids": jnp.zeros((1, 6))}
    params = {"unet": random_tree(shapes(UNet2DCondition(unet_cfg), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1, jnp.int32),
                                         jnp.zeros((1, 77, 2048)), added_cond=added), rng, dtype),
              "vae": random_tree(shapes(AutoencoderKL(vae_cfg), jnp.zeros((1, 16, 16, 3))), rng, dtype),
              "text_encoder": random_tree(shapes(CLIPTextModel(text_cfg), ids), rng, dtype),
              "text_encoder_2": random_tree(shapes(CLIPTextModel(text_cfg_2), ids), rng, dtype)}
    return StableDiffusion(unet_cfg, vae_cfg, text_cfg, params, text_config_2=text_cfg_2, pad_token_2=0,
                           force_zeros_for_empty_prompt=True, guidance_scale=5.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and UNet/text-encoder compute (the VAE computes in float32 either way)")
    ap.add_argument("--repeat", action="store_true", help="a second call, timed part by part (no compiling)")
    ap.add_argument("--out", default="sdxl_cpu.png", help="the first call's image")
    args = ap.parse_args()
    t0 = time.perf_counter()
    pipe = sdxl_pipeline(args.dtype)
    n = sum(np.size(a) for a in jax.tree.leaves(pipe.params))
    print(f"random SDXL weights: {n:,} parameters in {time.perf_counter() - t0:.0f} s, peak RSS {peak_rss_gib():.1f} GiB",
          flush=True)
    kw = dict(steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size, sampler="euler",
              dtype=args.dtype)
    t0 = time.perf_counter()
    images = pipe("a lighthouse at dusk", seed=0, progress=True, **kw)
    print(f"first call ({args.size} x {args.size}, {args.steps} steps, compiles): {time.perf_counter() - t0:.0f} s, "
          f"peak RSS {peak_rss_gib():.1f} GiB, image {images.shape}", flush=True)
    Image.fromarray(images[0]).save(args.out)
    if not args.repeat:
        return
    t0 = time.perf_counter()
    pipe.encode_prompt(["a lighthouse at dusk"])[0].block_until_ready()
    t_text = time.perf_counter() - t0
    t0 = time.perf_counter()
    x0 = pipe.sample_latents("a lighthouse at dusk", seed=1, **kw)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe.decode(x0)
    t_decode = time.perf_counter() - t0
    step = (t_sample - t_text) / args.steps
    print(f"second call: text {t_text:.1f} s, {step:.1f} s per step (guided batch of 2), VAE decode {t_decode:.1f} s; "
          f"30 steps ~ {(t_text + 30 * step + t_decode) / 60:.0f} min; peak RSS {peak_rss_gib():.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
