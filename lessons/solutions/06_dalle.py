# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 6 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minidiff.nn import dalle  # noqa: E402

# %% [markdown]
# ## 1. What sparse attention saves
# The causal mask among N = 1,024 image tokens has N(N+1)/2 = 524,800 pairs.  A row mask keeps one
# image row's worth of keys per query (32), a column mask one key per row above (up to 32), a 3 x 3
# conv mask at most 5 (the causal half): 6 %, 3 % and about 1 % of the pairs.  The cost of attention
# falls by the same factors, and stacking row and column layers still connects every token to every
# earlier one in two hops.

# %%
c = dalle.DalleConfig.paper()
causal = dalle.attention_mask("causal", c.text_len, c.grid)[c.text_len:, c.text_len:].sum()
kept = {p: dalle.attention_mask(p, c.text_len, c.grid)[c.text_len:, c.text_len:].sum() / causal for p in ("row", "column", "conv")}
n = c.image_len
print(f"causal image-to-image pairs: {causal:,} (= N(N+1)/2 = {n * (n + 1) // 2:,}); kept: "
      + ", ".join(f"{p} {100 * f:.1f} %" for p, f in kept.items()))
assert causal == n * (n + 1) // 2
assert kept["conv"] < kept["column"] < kept["row"] < 0.1

# %% [markdown]
# ## 2. Temperature and top-k
# Dividing the logits by a temperature below 1 sharpens the distribution (lower entropy), above 1
# flattens it — but every token keeps a nonzero probability.  Top-k sets all but the k most likely
# tokens to probability 0: only it removes the rare tokens entirely (the ones that, drawn once, can
# spoil a picture).

# %%
logits = jnp.asarray(np.random.default_rng(0).standard_normal(512) * 3.0)[None]  # a peaked distribution


def entropy_and_support(filtered):
    p = np.asarray(jax.nn.softmax(filtered, axis=-1))[0]
    return float(-(p[p > 0] * np.log(p[p > 0])).sum()), int((p > 0).sum())


by_temperature = {t: entropy_and_support(dalle.filter_logits(logits, temperature=t)) for t in (0.5, 1.0, 2.0)}
by_k = {k: entropy_and_support(dalle.filter_logits(logits, top_k=k)) for k in (512, 64, 8)}
for name, table in (("temperature", by_temperature), ("top-k", by_k)):
    print(name + ": " + ", ".join(f"{k}: entropy {h:.2f} nats over {n} tokens" for k, (h, n) in table.items()))
assert by_temperature[0.5][0] < by_temperature[1.0][0] < by_temperature[2.0][0]
assert all(n == 512 for _, n in by_temperature.values())
assert [n for _, n in by_k.values()] == [512, 64, 8] and by_k[8][0] < by_k[64][0] < by_k[512][0]
