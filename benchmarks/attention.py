"""One self-attention at SD 1.5's 64x64 latents, (batch 2, 4096 queries, 8 heads, d 40), float32:
minidiff's CPU kernel with one pass over all keys, and in blocks of 256 keys (online softmax), next
to torch's fused scaled_dot_product_attention, in one run (best of 3, after a warm-up).

    python benchmarks/attention.py
"""

import os
import sys

import jax
import numpy as np
import torch

import minidiff.nn.layers as layers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_seconds  # noqa: E402

B, N, H, D = 2, 4096, 8, 40


def best(f, *args, repeats=3):
    return best_seconds(lambda: jax.block_until_ready(f(*args)), repeats)


def main():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, N, H, D)).astype(np.float32) for _ in range(3))
    blocked = jax.jit(lambda q, k, v: layers.attention(q, k, v, chunk_size=1024))
    t_blocked, out = best(blocked, q, k, v), np.asarray(blocked(q, k, v))
    key_block = layers._key_block
    layers._key_block = lambda Lk: None  # one pass over all keys (the kernel before the blocks)
    one_pass = jax.jit(lambda q, k, v: layers.attention(q, k, v, chunk_size=1024))
    t_one = best(one_pass, q, k, v)
    err = float(np.abs(np.asarray(one_pass(q, k, v)) - out).max())
    layers._key_block = key_block
    tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).contiguous() for a in (q, k, v))
    with torch.inference_mode():
        t_torch = best(torch.nn.functional.scaled_dot_product_attention, tq, tk, tv)
    print(f"attention ({B}, {N}, {H}, {D}) float32, seconds: minidiff one pass {t_one:.3f}, minidiff in key blocks "
          f"{t_blocked:.3f} (max difference {err:.1e}), torch sdpa {t_torch:.3f}")


if __name__ == "__main__":
    main()
