# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 3 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.nn.layers import attention, timestep_embedding  # noqa: E402

# %% [markdown]
# ## 1. A shift is a rotation
# $\cos((t+\Delta)\omega) = \cos(t\omega)\cos(\Delta\omega) - \sin(t\omega)\sin(\Delta\omega)$ and
# $\sin((t+\Delta)\omega) = \sin(t\omega)\cos(\Delta\omega) + \cos(t\omega)\sin(\Delta\omega)$: each (cos, sin) pair is rotated
# by the angle $\Delta\omega_i$, whatever t is.  So a relative offset is one fixed linear map — exactly
# what a linear layer can represent — and the dot product of two embeddings depends only on
# $t - t'$: $\sum_i \cos((t - t')\omega_i)$.

# %%
dim, half, delta = 320, 160, 37
omega = np.exp(-np.log(10000.0) * np.arange(half) / half)
t = np.arange(1000 - delta)
e_t, e_shift = np.asarray(timestep_embedding(t, dim), np.float64), np.asarray(timestep_embedding(t + delta, dim), np.float64)
c, s = np.cos(delta * omega), np.sin(delta * omega)
rotated = np.concatenate([e_t[:, :half] * c - e_t[:, half:] * s, e_t[:, half:] * c + e_t[:, :half] * s], axis=1)
print(f"max |emb(t + {delta}) - R emb(t)| = {np.abs(e_shift - rotated).max():.1e} (float32 embeddings)")
assert np.abs(e_shift - rotated).max() < 1e-3
dots = e_t @ e_t.T
assert np.allclose(dots[100, 200], dots[300, 400], atol=1e-2)  # depends on t - t' only

# %% [markdown]
# ## 2. Attention does not know where
# $\mathrm{softmax}(q k^T)v$ sums over keys; reordering the keys and values together changes nothing,
# and reordering the queries reorders the output rows.  SD's UNet has no position embedding in its
# attention: positions come from the convolutions around it (each sees a 3 x 3 neighbourhood, and
# zero padding marks the borders), which mix "where" into every feature before attention reads it.

# %%
key = jax.random.key(0)
q, k, v = (jax.random.normal(kk, (1, 256, 2, 16)) for kk in jax.random.split(key, 3))
perm = np.random.default_rng(0).permutation(256)
out, out_perm = np.asarray(attention(q, k, v)), np.asarray(attention(q[:, perm], k[:, perm], v[:, perm]))
print(f"max |attention(P x) - P attention(x)| = {np.abs(out_perm - out[:, perm]).max():.1e}")
assert np.allclose(out_perm, out[:, perm], atol=1e-5)

# %% [markdown]
# ## 3. The memory of one attention
# 4,096 queries x 4,096 keys x 8 heads x 2 images x 4 bytes = 1 GiB for one layer's weights at once;
# 256 queries at a time hold 1/16 of it, 64 MiB.  (SD 1.5 has 16 such layers, run one after the
# other; the memory is reused.)  Chunking splits the queries only, and each query's softmax is over
# all keys, so the result is the same up to float rounding.

# %%
tokens, heads, batch = 64 * 64, 8, 2
full_bytes = tokens * tokens * heads * batch * 4
chunk_bytes = 256 * tokens * heads * batch * 4
print(f"attention weights: {full_bytes / 2**30:.2f} GiB at once, {chunk_bytes / 2**20:.0f} MiB with chunk_size=256")
assert full_bytes == 2**30 and chunk_bytes == 64 * 2**20
n = 1024 if QUICK else 4096
q, k, v = (jax.random.normal(kk, (1, n, 2, 40)) for kk in jax.random.split(jax.random.key(1), 3))
diff = float(np.abs(np.asarray(attention(q, k, v)) - np.asarray(attention(q, k, v, chunk_size=256))).max())
print(f"max |full - chunked| = {diff:.1e}")
assert diff < 1e-5
