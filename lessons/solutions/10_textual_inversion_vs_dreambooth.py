# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 10 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402

from minidiff.nn.unet import UNet2DCondition, UNetConfig  # noqa: E402
from minidiff.train.configs import LoRAConfig  # noqa: E402

# %% [markdown]
# ## 1. The bytes at Stable Diffusion's size
# Textual inversion keeps 768 numbers (1.5 KB in float16); DreamBooth the whole UNet, 860 M numbers
# (1.7 GB in float16); LoRA of rank 4 on the 4 projections of the 32 attentions
# ($r(d_{in} + d_{out})$ numbers each) about 0.8 M numbers, 1.6 MB — a thousandth of DreamBooth.

# %%
shapes = jax.eval_shape(lambda: UNet2DCondition(UNetConfig.sd15()).init(
    jax.random.key(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros(1), jnp.zeros((1, 77, 768))))
flat = flatten_dict(shapes["params"])
unet_numbers = sum(int(np.prod(a.shape)) for a in flat.values())
projections = [a.shape for path, a in flat.items() if path[-1] == "kernel" and path[-2] in LoRAConfig.targets]
rank = 4
lora_numbers = sum(rank * (d_in + d_out) for d_in, d_out in projections)
sizes = {"textual inversion": 768 * 2, "DreamBooth": unet_numbers * 2, "LoRA r=4": lora_numbers * 2}
print(f"{len(projections)} attention projections; " + ", ".join(f"{k}: {v / 2**20:,.3f} MiB" for k, v in sizes.items()))
assert unet_numbers == 859_520_964 and len(projections) == 128
assert 1000 * sizes["LoRA r=4"] < 2 * sizes["DreamBooth"] and lora_numbers == 797_184

# %% [markdown]
# ## 2. What the LoRA update can express
# $BA$ is a product through an r-dimensional space: its column space lies in B's r columns, so its
# rank is at most r — every singular value after the r-th is zero (to rounding).  With
# $r = \min(d_{in}, d_{out})$ any $\Delta W$ factors exactly (e.g. $B = \Delta W$, $A = I$ when $d_{in} \le d_{out}$;
# generally via the SVD), so a full-rank LoRA is full fine-tuning of that layer — small ranks are a
# *restriction*, the bet that the change fine-tuning needs is low-rank (Hu et al. 2021).

# %%
rng = np.random.default_rng(0)
d_in, d_out, r, alpha = 320, 320, 4, 4.0
B, A = rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in))
singular = np.linalg.svd(alpha / r * B @ A, compute_uv=False)
print(f"rank-{r} update: singular values {np.round(singular[:r + 2], 3)} ...")
assert singular[r] < 1e-10 * singular[0]
delta = rng.standard_normal((d_out, d_in))
U, S, Vt = np.linalg.svd(delta)
B_full, A_full = U * S, Vt  # rank min(d_in, d_out): exact
print(f"full-rank factorisation: max |B A - dW| = {np.abs(B_full @ A_full - delta).max():.1e}")
assert np.allclose(B_full @ A_full, delta, atol=1e-10)
