"""Time per image at equal quality: DDIM at 50 steps against the samplers that reach DDIM-50's error in
fewer network evaluations (benchmarks/sampler_nfe.py: DPM++ 2M Karras at 15, UniPC Karras at 12),
SD 1.5-size random weights, minidiff next to diffusers' StableDiffusionPipeline, in one run.

    python benchmarks/sampler_time.py [--size 128] [--runs "ddim:50" "DPM++ 2M Karras:15" "UniPC Karras:12"]

Each (implementation, sampler) runs in its own subprocess (benchmarks/txt2img.py's): one prompt, guidance
7.5 (the UNet on a batch of 2), text encoding and VAE decoding inside the timed call; minidiff's first
call compiles, the second is timed; diffusers is warmed up once.  Printed: seconds per image, the ratio
minidiff / diffusers, and each one's speed-up over its own DDIM-50.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from txt2img import measure  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--runs", nargs="+", default=["ddim:50", "DPM++ 2M Karras:15", "UniPC Karras:12"],
                    help="SAMPLER:STEPS, the first one the baseline")
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args()
    runs = [(r.rsplit(":", 1)[0], int(r.rsplit(":", 1)[1])) for r in args.runs]

    print(f"SD 1.5-size txt2img at {args.size}x{args.size}, random weights, 1 prompt, guidance {args.guidance}, "
          "fp32, CPU: seconds per image")
    print("| sampler | steps | minidiff s | diffusers s | minidiff / diffusers | minidiff speed-up | diffusers "
          "speed-up | peak RSS minidiff | peak RSS diffusers |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for sampler, steps in runs:
        r = {impl: measure(impl, args.size, steps, args.guidance, sampler) for impl in ("minidiff", "diffusers")}
        base = base or r
        m, d = r["minidiff"]["total"], r["diffusers"]["total"]
        print(f"| {sampler} | {steps} | {m:.1f} | {d:.1f} | {m / d:.2f} | {base['minidiff']['total'] / m:.1f}x | "
              f"{base['diffusers']['total'] / d:.1f}x | {r['minidiff']['peak_rss_mib'] / 1024:.1f} GiB | "
              f"{r['diffusers']['peak_rss_mib'] / 1024:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
