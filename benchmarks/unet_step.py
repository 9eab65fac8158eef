"""One forward pass of the SD 1.5-size UNet: minidiff (Flax, jit-compiled) next to diffusers'
UNet2DConditionModel (PyTorch), random weights, batch 2, context 77x768, 64x64 and 32x32 latents.

    python benchmarks/unet_step.py [--sizes 64 32] [--repeats 3] [--chunk 1024] [--config sd15|small] [--xla-default]

Each implementation runs in its own subprocess so that its peak RSS is its own.  Prints seconds
per forward (best of --repeats, after one warm-up), minidiff's compile time, the ratio
minidiff / diffusers, and peak RSS.  ``--config small`` is a quick smoke run with a tiny UNet.
``--xla-default`` adds a run of minidiff under JAX's own XLA CPU settings (MINIDIFF_XLA_DEFAULTS=0,
see ``minidiff.xla_cpu``), in the same run.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_seconds  # noqa: E402

SMALL = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_minidiff(size, repeats, chunk, config):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minidiff.nn.unet import UNet2DCondition, UNetConfig

    if config == "sd15":
        cfg = UNetConfig.sd15(attention_chunk_size=chunk)
    else:
        cfg = UNetConfig(block_out_channels=SMALL["block_out_channels"], attention_chunk_size=chunk)
    model = UNet2DCondition(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, size, size, 4)), jnp.float32)
    t = jnp.array([981, 981])
    ctx = jnp.asarray(rng.standard_normal((2, 77, 768)), jnp.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, t, ctx)["params"]
    forward = jax.jit(model.apply)
    t0 = time.perf_counter()
    compiled = forward.lower({"params": params}, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    seconds = best_seconds(lambda: compiled({"params": params}, x, t, ctx).block_until_ready(), repeats)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(seconds=seconds, compile=compile_s, flops=float(cost.get("flops", 0.0)))


def matmul_peak(n=4096, repeats=3):
    """The machine's float32 matmul rate (FLOP/s): the best of a few n x n products, in JAX and in torch."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()  # compile
    return [(name, 2 * n**3 / best_seconds(mm, repeats))
            for name, mm in (("jax", lambda: f(a).block_until_ready()), ("torch", lambda: torch.ones(n, n) @ torch.ones(n, n)))]


def run_diffusers(size, repeats, config):
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if config == "sd15":
        model = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.x defaults
    else:
        model = UNet2DConditionModel(sample_size=size, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **SMALL)
    model.eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 4, size, size)).astype(np.float32))
    t = torch.tensor([981, 981])
    ctx = torch.from_numpy(rng.standard_normal((2, 77, 768)).astype(np.float32))
    with torch.inference_mode():
        seconds = best_seconds(lambda: model(x, t, ctx), repeats)
    return dict(seconds=seconds, compile=0.0, threads=torch.get_num_threads())


def child(args):
    if args.impl == "minidiff":
        r = run_minidiff(args.size, args.repeats, args.chunk, args.config)
    else:
        r = run_diffusers(args.size, args.repeats, args.config)
    r["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(r))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="attention query chunk (0 = unchunked)")
    ap.add_argument("--config", choices=["sd15", "small"], default="sd15")
    ap.add_argument("--xla-default", action="store_true", help="also time minidiff under JAX's default XLA flags")
    ap.add_argument("--impl", choices=["minidiff", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.chunk = args.chunk or None
    if args.impl:
        return child(args)

    print(f"UNet forward, config {args.config}, batch 2, context 77x768, fp32, best of {args.repeats} "
          f"(attention chunk {args.chunk})")
    print(f"{'latents':>8s} {'minidiff s':>11s} {'diffusers s':>12s} {'ratio':>6s} {'compile s':>10s} "
          f"{'RSS minidiff':>13s} {'RSS diffusers':>14s}")
    for size in args.sizes:
        res = {}
        runs = [("minidiff", "minidiff", {}), ("diffusers", "diffusers", {})]  # (label, --impl, environment)
        if args.xla_default:
            runs.append(("jax-default", "minidiff", {"MINIDIFF_XLA_DEFAULTS": "0"}))
        for label, impl, env in runs:
            cmd = [sys.executable, __file__, "--impl", impl, "--size", str(size), "--repeats", str(args.repeats),
                   "--chunk", str(args.chunk or 0), "--config", args.config]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
            res[label] = json.loads(line[0][7:])
        m, d = res["minidiff"], res["diffusers"]
        print(f"{size:>5d}^2 {m['seconds']:11.2f} {d['seconds']:12.2f} {m['seconds'] / d['seconds']:6.2f} "
              f"{m['compile']:10.1f} {m['peak_rss_mib']:10.0f} MiB {d['peak_rss_mib']:11.0f} MiB", flush=True)
        if m.get("flops"):
            print(f"{'':>8s} {m['flops'] / 1e9:.0f} GFLOP per forward (XLA's count): minidiff "
                  f"{m['flops'] / m['seconds'] / 1e9:.1f} GFLOP/s, diffusers {m['flops'] / d['seconds'] / 1e9:.1f} "
                  "GFLOP/s", flush=True)
        if "jax-default" in res:
            j = res["jax-default"]
            print(f"{'':>8s} minidiff under JAX's default XLA CPU flags (YNNPACK kernels): {j['seconds']:.2f} s, "
                  f"ratio {j['seconds'] / d['seconds']:.2f}, compile {j['compile']:.1f} s", flush=True)
    peaks = matmul_peak()
    print("float32 matmul peak of this machine (4096^2, best of 3): " +
          ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in peaks))


if __name__ == "__main__":
    main()
