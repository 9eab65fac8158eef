"""Sampling speed of the DALL-E-style transformer: image tokens per second with the key-value cache
next to the plain loop that runs the whole sequence again for every token (the reference a
cache must beat), measured in the same run, at several batch sizes, with and without guidance.

    python benchmarks/dalle_sampling.py [--batch 1 16 64] [--repeats 3] [--checkpoint runs/dalle]

Without --checkpoint the transformer has `minidiff train-dalle`'s default size and random weights
(speed does not depend on the weights).  Prints tokens/s, the speed-up, and the peak RSS.
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def model_and_params(checkpoint):
    from minidiff.data import CaptionTokenizer
    from minidiff.nn import dalle

    if checkpoint:
        from minidiff.train.dalle import load_dalle

        g = load_dalle(checkpoint)
        return g.model, g.params
    from minidiff.train.dalle import DalleTrainConfig

    tok = CaptionTokenizer()
    config = dalle.DalleConfig(text_vocab=tok.vocab_size, text_len=tok.length, num_codes=512, grid=8,
                               **DalleTrainConfig().model)
    model = dalle.DalleTransformer(config)
    return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.seq_len), jnp.int32))["params"]


def tokens_per_s(fn, n_tokens, repeats):
    fn(0).block_until_ready()  # compile
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        fn(r + 1).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return n_tokens / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", help="a train-dalle run folder (default: random weights)")
    args = ap.parse_args()

    from minidiff.data import CaptionTokenizer
    from minidiff.nn import dalle

    model, params = model_and_params(args.checkpoint)
    c = model.config
    text = CaptionTokenizer(c.text_len).encode(["a small red circle in the top left"])
    print(f"transformer: width {c.width}, {c.layers} layers, {c.text_len} text + {c.image_len} image tokens; "
          f"{jax.devices()[0].platform}, best of {args.repeats}")
    print(f"{'batch':>5}  {'guidance':>8}  {'cache tok/s':>11}  {'no cache tok/s':>14}  {'speed-up':>8}")
    for b in args.batch:
        t = jnp.asarray(np.repeat(text, b, axis=0))
        for s in (1.0, 2.0):
            rate = {}
            for use_cache in (True, False):
                f = jax.jit(lambda key, use_cache=use_cache, s=s: dalle.sample(model, params, t, key, guidance_scale=s,
                                                                            use_cache=use_cache))
                rate[use_cache] = tokens_per_s(lambda r, f=f: f(jax.random.PRNGKey(r)), b * c.image_len, args.repeats)
            print(f"{b:5d}  {s:8.1f}  {rate[True]:11.0f}  {rate[False]:14.0f}  {rate[True] / rate[False]:7.1f}x")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
