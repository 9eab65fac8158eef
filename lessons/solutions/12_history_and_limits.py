# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 12 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from minidiff.nn import dalle  # noqa: E402
from minidiff.nn.autoencoder import AutoencoderKL, AutoencoderKLConfig  # noqa: E402
from minidiff.nn.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from minidiff.nn.unet import UNet2DCondition, UNetConfig  # noqa: E402


def count(init) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(jax.eval_shape(init)))


key = jax.random.key(0)

# %% [markdown]
# ## 1. Two roads, in parameters
# DALL-E: 12.29 billion.  SD 1.5: 859.5 M (UNet) + 83.7 M (VAE) + 123.1 M (text encoder) = 1.07
# billion — about 11.5 times smaller, and it draws at 512 x 512 where DALL-E drew 256 x 256.  Latent
# diffusion moved the pixels' detail into a small, separately trained autoencoder and left the
# generative model a 64 x 64 x 4 problem.

# %%
n_dalle = count(lambda: dalle.DalleTransformer(dalle.DalleConfig.paper()).init(key, jnp.zeros((1, 2), jnp.int32)))
n_unet = count(lambda: UNet2DCondition(UNetConfig.sd15()).init(key, jnp.zeros((1, 64, 64, 4)), jnp.zeros(1),
                                                              jnp.zeros((1, 77, 768))))
n_vae = count(lambda: AutoencoderKL(AutoencoderKLConfig.sd()).init(key, jnp.zeros((1, 64, 64, 3))))
n_text = count(lambda: CLIPTextModel(CLIPTextConfig.sd15()).init(key, jnp.zeros((1, 77), jnp.int32)))
n_sd = n_unet + n_vae + n_text
print(f"DALL-E {n_dalle:,}; SD 1.5 {n_sd:,} (UNet {n_unet:,}, VAE {n_vae:,}, text {n_text:,}); ratio {n_dalle / n_sd:.1f}")
assert n_unet == 859_520_964 and n_text == 123_060_480 and n_vae == 83_653_863
assert 11 < n_dalle / n_sd < 12

# %% [markdown]
# ## 2. Two roads, in sequential passes
# DALL-E: 1,024 passes one after the other (each token waits for the previous one), each a single
# position through 64 layers attending to up to 1,279 cached positions — the number of passes grows
# with the picture's area.  SD: 20 passes (the guided batch of 2 runs in one pass), each over all
# 64 x 64 latent positions at once — the number of passes is fixed by the sampler, and the cost of
# each grows with the area (quadratically in its self-attention).  Fewer, wider passes are what a
# GPU does best.

# %%
tokens = dalle.DalleConfig.paper().image_len
sd_steps, guided_batch = 20, 2
print(f"DALL-E: {tokens} sequential passes; SD: {sd_steps} sequential passes of a batch of {guided_batch} "
      f"({sd_steps * guided_batch} UNet evaluations); {tokens / sd_steps:.0f}x fewer sequential passes")
assert tokens == 1024 and tokens / sd_steps > 50
