# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 8 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import numpy as np  # noqa: E402

from minidiff.tokenizer import CLIPTokenizer  # noqa: E402

tok = CLIPTokenizer.from_bpe_gz()

# %% [markdown]
# ## 1. What BPE does with rare words
# Common words were merged into one token during BPE's training ("cat</w>"); rarer ones are left as
# the longest pieces the merges reach ("photo" + "realistic", "art" + "station").  Because the base
# vocabulary holds all 256 bytes (`bytes_to_unicode`), any string — an unknown name, an emoji —
# falls back to pieces that exist: nothing is ever out of vocabulary, only longer.

# %%
pieces = {w: tok.tokenize(w) for w in ("cat", "photorealistic", "artstation", "minidiff", "🦙")}
for w, p in pieces.items():
    print(f"{w!r:18s} {len(p)} token(s): {p}")
assert len(pieces["cat"]) == 1 and len(pieces["photorealistic"]) >= 2 and len(pieces["minidiff"]) >= 2
assert all(tok.decode(tok.encode(w)).strip() == w for w in pieces)  # every string round-trips

# %% [markdown]
# ## 2. Why the temperature is learned
# With cosines 0.3 (diagonal) and 0.1 (elsewhere), each row's softmax gives the match
# $e^{0.3/\tau} / (e^{0.3/\tau} + 31 e^{0.1/\tau})$.  At $\tau = 1$ that is barely above 1/32: the loss stays
# within 0.2 of $\log 32 = 3.47$ for a model that is already perfect at ranking, and the gradient keeps
# pushing all cosines apart without end.  At $\tau = 0.01$ the same margin is worth a loss near 0.
# CLIP learns $\tau$ (from 0.07, clipped at 0.01) so the loss can reward a margin of the size its
# embeddings can achieve.

# %%
B = 32
cos = np.full((B, B), 0.1) + 0.2 * np.eye(B)


def infonce(logits):
    rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    return -0.5 * (np.diag(rows).mean() + np.diag(cols).mean())


loss = {tau: infonce(cos / tau) for tau in (1.0, 0.07, 0.01)}
for tau, value in loss.items():
    print(f"tau = {tau:4}: loss {value:.3f}   (log B = {np.log(B):.3f})")
assert np.log(B) - loss[1.0] < 0.2 and loss[0.01] < 0.01 and loss[1.0] > loss[0.07] > loss[0.01]
