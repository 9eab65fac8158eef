# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 5 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff import vq  # noqa: E402

sg = jax.lax.stop_gradient

# %% [markdown]
# ## 1. Without the straight-through estimator
# $z_q = e_{k(z)}$ with $k(z) = \arg\min_k \|z - e_k\|$: a piecewise-constant function of $z$, whose
# derivative is 0 almost everywhere.  So the decoder's loss reaches the codebook (through $z_q$) and
# the decoder, but never the encoder; the encoder moves only by the commitment term, which pulls
# $z$ towards the code it already has.  An encoder that starts badly — here rank 1, merging two
# clusters — stays bad, and the codebook and decoder cannot undo the merge.  With ST the
# decoder's gradient passes to $z$ as if quantization were the identity, and the encoder learns to
# separate the clusters.

# %%
centres = 2 * np.array([[-2, -1], [1.5, 1.5], [1, -1.5], [-1, 2]], np.float32)


def points(n, r):
    return (centres[r.integers(4, size=n)] + r.normal(0, 0.3, (n, 2))).astype(np.float32)


def start(seed=0):
    r = np.random.default_rng(seed)
    d = centres[0] - centres[2]
    u = np.array([-d[1], d[0]]) / np.linalg.norm(d)  # u . (c0 - c2) = 0: clusters 0 and 2 merge
    return {"enc": jnp.asarray(np.outer(u, [1.0, 0.0]) + r.normal(0, 1e-3, (2, 2)), jnp.float32),
            "dec": jnp.eye(2), "book": jnp.asarray(r.normal(0, 0.1, (8, 2)), jnp.float32)}


def losses(p, x, st: bool):
    z = x @ p["enc"]
    _, z_q = vq.quantize(z, p["book"])
    z_dec = z + sg(z_q - z) if st else z_q
    reconstruction = jnp.mean((z_dec @ p["dec"] - x) ** 2)
    codebook, commitment = jnp.mean((sg(z) - z_q) ** 2), 0.25 * jnp.mean((z - sg(z_q)) ** 2)
    return reconstruction, codebook + commitment


x_test = points(4000, np.random.default_rng(9))
final = {}
for st in (True, False):
    grad_rec = jax.grad(lambda p: losses(p, x_test, st)[0])(start())["enc"]
    print(f"ST={st!s:5s}: |d reconstruction / d W_e| = {float(jnp.abs(grad_rec).max()):.3g}")
    if not st:
        assert float(jnp.abs(grad_rec).max()) == 0.0
    p, opt, r = start(), optax.adam(0.02), np.random.default_rng(1)
    state = opt.init(p)
    step = jax.jit(jax.grad(lambda p, x: sum(losses(p, x, st))))
    for _ in range(300 if QUICK else 1500):
        updates, state = opt.update(step(p, points(128, r)), state)
        p = optax.apply_updates(p, updates)
    final[st] = float(losses(p, x_test, st)[0])
    used = len(np.unique(vq.quantize(x_test @ p["enc"], p["book"])[0]))
    print(f"ST={st!s:5s}: reconstruction MSE after training {final[st]:.3f}, {used} codes in use")
assert final[False] > 1.5 * final[True]

# %% [markdown]
# ## 2. Perplexity in bits
# With usage frequencies $p_k$, $H = -\sum_k p_k \log_2 p_k$ and the perplexity is $2^H$ (the same number
# as $e^{H_{nats}}$): $\log_2 K$ bits and perplexity K when all K codes are used equally, 0 bits and
# perplexity 1 when one code takes everything.  An 8 x 8 grid of 512 codes carries at most
# $64 \cdot 9 = 576$ bits; the 32 x 32 RGB picture is $32 \cdot 32 \cdot 3 \cdot 8 = 24{,}576$ bits: at least a 43x
# compression, before the transformer of lesson 6 even models which grids are likely.

# %%
K = 512
uniform = np.arange(K * 10) % K
collapsed = np.zeros(1000, int)
p_mixed = np.random.default_rng(0).dirichlet(np.ones(K))
mixed = np.random.default_rng(1).choice(K, size=200_000, p=p_mixed)
counts = np.bincount(mixed, minlength=K) / len(mixed)
H_bits = -np.sum(counts[counts > 0] * np.log2(counts[counts > 0]))
print(f"uniform {vq.perplexity(uniform, K):.1f}, collapsed {vq.perplexity(collapsed, K):.1f}, "
      f"Dirichlet usage {vq.perplexity(mixed, K):.1f} = 2^H = {2 ** H_bits:.1f}")
assert abs(vq.perplexity(uniform, K) - K) < 1e-6 and abs(vq.perplexity(collapsed, K) - 1) < 1e-6
assert abs(vq.perplexity(mixed, K) - 2**H_bits) < 1e-6 * K
grid_bits, picture_bits = 8 * 8 * np.log2(K), 32 * 32 * 3 * 8
print(f"{grid_bits:.0f} bits per grid vs {picture_bits} bits per picture: {picture_bits / grid_bits:.0f}x")
assert grid_bits == 576
