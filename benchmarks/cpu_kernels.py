"""The kernels of SD 1.5's UNet one at a time, float32, batch 2: minidiff under the XLA CPU flag it sets
(XLA's Eigen kernels, ``minidiff.xla_cpu``), under JAX's default (YNNPACK kernels), and torch, in one run.

    python benchmarks/cpu_kernels.py [--repeats 5]

Each column runs in its own process (the XLA flag is read once, when JAX's backend starts).  Prints
milliseconds (best of --repeats, after a warm-up) and GFLOP/s for 3x3 convolutions at the UNet's four
resolutions at 64x64 latents and at 2x2 (its deepest level at 16x16 latents: minidiff's product of
patches, and XLA's own convolution), its dense layers at 64x64 latents (8,192 tokens) and one
self-attention at 64x64 and 32x32.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_seconds  # noqa: E402

# (H = W, channels in = out, through): minidiff's convolution (layers.conv_general_dilated), or XLA's
# directly, which at 2x2 (SD's deepest level at 16x16 latents) swaps its operands (the slow form)
CONVS = [(64, 320, "minidiff"), (32, 640, "minidiff"), (16, 1280, "minidiff"), (8, 1280, "minidiff"),
         (2, 1280, "minidiff"), (2, 1280, "XLA")]
DENSES = [(8192, 320, 1280), (8192, 1280, 320), (8192, 320, 2560)]  # (tokens, in, out): to_q.., ff
ATTENTIONS = [(4096, 40), (1024, 80)]  # (tokens, head dim), 8 heads


def cases():
    for h, c, through in CONVS:
        yield f"conv 3x3 {h}x{h}x{c}" + (f" ({through}'s)" if h < 3 else ""), 2 * 2 * h * h * 9 * c * c
    for n, i, o in DENSES:
        yield f"dense {n}x{i} -> {o}", 2 * n * i * o
    for n, d in ATTENTIONS:
        yield f"self-attention {n} tokens, 8 x {d}", 4 * 2 * 8 * n * n * d


def run_jax(repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from minidiff.nn.layers import attention, conv_general_dilated

    rng = np.random.default_rng(0)
    a = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    convs = {name: jax.jit(lambda x, w, f=f: f(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
             for name, f in (("minidiff", conv_general_dilated), ("XLA", jax.lax.conv_general_dilated))}
    dense = jax.jit(lambda x, w: x @ w)
    attend = jax.jit(lambda q, k, v: attention(q, k, v, chunk_size=1024))
    out = []
    for h, c, through in CONVS:
        x, w = a(2, h, h, c), a(3, 3, c, c)
        out.append(best_seconds(lambda: convs[through](x, w).block_until_ready(), repeats))
    for n, i, o in DENSES:
        x, w = a(n, i), a(i, o)
        out.append(best_seconds(lambda: dense(x, w).block_until_ready(), repeats))
    for n, d in ATTENTIONS:
        q, k, v = a(2, n, 8, d), a(2, n, 8, d), a(2, n, 8, d)
        out.append(best_seconds(lambda: attend(q, k, v).block_until_ready(), repeats))
    return out


def run_torch(repeats):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    out = []
    with torch.inference_mode():
        for h, c, _ in CONVS:
            x, w = torch.randn(2, c, h, h), torch.randn(c, c, 3, 3)
            out.append(best_seconds(lambda: F.conv2d(x, w, padding=1), repeats))
        for n, i, o in DENSES:
            x, w = torch.randn(n, i), torch.randn(o, i)
            out.append(best_seconds(lambda: F.linear(x, w), repeats))
        for n, d in ATTENTIONS:
            q, k, v = (torch.randn(2, 8, n, d) for _ in range(3))
            out.append(best_seconds(lambda: F.scaled_dot_product_attention(q, k, v), repeats))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        print("RESULT " + json.dumps(run_jax(args.repeats) if args.impl == "jax" else run_torch(args.repeats)))
        return
    columns = {}
    for name, impl, defaults in (("minidiff (Eigen)", "jax", "1"), ("JAX default (YNNPACK)", "jax", "0"),
                                 ("torch", "torch", "1")):
        env = dict(os.environ, MINIDIFF_XLA_DEFAULTS=defaults)
        r = subprocess.run([sys.executable, __file__, "--impl", impl, "--repeats", str(args.repeats)],
                           capture_output=True, text=True, env=env)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        columns[name] = json.loads(line[0][7:])
    print(f"float32, batch 2, best of {args.repeats}: milliseconds (GFLOP/s)")
    print(f"{'kernel':34s}" + "".join(f"{name:>24s}" for name in columns))
    for i, (label, flops) in enumerate(cases()):
        print(f"{label:34s}" + "".join(f"{1e3 * t[i]:13.1f} ({flops / t[i] / 1e9:5.0f})    " for t in columns.values()))


if __name__ == "__main__":
    main()
