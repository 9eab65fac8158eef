"""Stable Diffusion 1.5-size text-to-image on a GPU or TPU: images per second and peak device memory,
minidiff (bfloat16 by default there) next to diffusers in float16 on the same device (when torch with
CUDA is installed), random weights, in one run.

    python benchmarks/accelerator.py [--size 512] [--steps 25] [--batches 1 4 8] [--sampler "DPM++ 2M Karras"]

Each (implementation, batch) runs in its own subprocess: one warm-up call (minidiff compiles), then a
timed call of ``batch`` prompts with guidance 7.5 (the UNet runs on 2 x batch rows), text encoding and
VAE decoding included.  Peak memory: JAX's ``peak_bytes_in_use`` of the device, torch's
``max_memory_allocated``.  On a CPU it runs too (both sides on the CPU, no device memory figures): a
check that the script works, e.g. ``--size 128 --steps 2 --batches 1``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from txt2img import PROMPT, diffusers_pipeline, minidiff_pipeline  # noqa: E402


def run_minidiff(size, steps, batch, sampler):
    import jax
    import jax.numpy as jnp

    from minidiff.nn.layers import attention_implementation
    from minidiff.pipeline import default_dtype

    pipe = minidiff_pipeline()
    kw = dict(steps=steps, height=size, width=size, sampler=sampler, guidance_scale=7.5)
    pipe([PROMPT] * batch, seed=0, **kw)  # compiles
    t0 = time.perf_counter()
    pipe([PROMPT] * batch, seed=1, **kw)
    seconds = time.perf_counter() - t0
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    q = jnp.zeros((1, 1, 8, 40), default_dtype())
    return dict(seconds=seconds, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30 or None,
                device=device.device_kind, dtype=default_dtype(), attention=attention_implementation(q))


def run_diffusers(size, steps, batch, sampler):
    import numpy as np
    import torch

    from minidiff.tokenizer import CLIPTokenizer

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    pipe, text = diffusers_pipeline(sampler, device, dtype)
    ids = torch.from_numpy(np.asarray(CLIPTokenizer.from_bpe_gz()([PROMPT, ""]))).long().to(device)

    def call():
        with torch.inference_mode():
            embeds = text(ids)[0]
            pipe(prompt_embeds=embeds[:1].repeat(batch, 1, 1), negative_prompt_embeds=embeds[1:].repeat(batch, 1, 1),
                 num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np")
        if cuda:
            torch.cuda.synchronize()

    call()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype).replace("torch.", ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--sampler", default="DPM++ 2M Karras")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        run = run_minidiff if args.impl == "minidiff" else run_diffusers
        print("RESULT " + json.dumps(run(args.size, args.steps, args.batch, args.sampler)))
        return

    print(f"SD 1.5-size txt2img, random weights, {args.size}x{args.size}, {args.sampler} {args.steps} steps, "
          "guidance 7.5")
    print("| implementation | device | dtype | batch | seconds | images / s | peak device memory |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        for impl in ("minidiff",) + (() if args.no_diffusers else ("diffusers",)):
            cmd = [sys.executable, __file__, "--impl", impl, "--batch", str(batch), "--size", str(args.size),
                   "--steps", str(args.steps), "--sampler", args.sampler]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                print(f"| {impl} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else '?'} |")
                continue
            r = json.loads(line[0][7:])
            peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] else "-"
            name = impl + (f" ({r['attention']} attention)" if "attention" in r else "")
            print(f"| {name} | {r['device']} | {r['dtype']} | {batch} | {r['seconds']:.2f} | "
                  f"{batch / r['seconds']:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
