# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 9 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.diffusion import split_prediction  # noqa: E402
from minidiff.nn.unet import UNet2DCondition  # noqa: E402
from minidiff.pipeline import load_pipeline  # noqa: E402

pipe = load_pipeline()

# %% [markdown]
# ## 1. Guidance in v or in epsilon
# At a fixed $x_t$ the conversions are affine in the prediction: $\varepsilon = \sqrt{\bar\alpha}\,v + \sqrt{1-\bar\alpha}\,x_t$ and
# $\hat x_0 = \sqrt{\bar\alpha}\,x_t - \sqrt{1-\bar\alpha}\,v$.  An affine map $f(v) = a v + b$ commutes with an affine
# combination whose weights sum to 1: $f(v_u + s(v_c - v_u)) = (1-s)f(v_u) + s f(v_c)$, because the $b$ terms
# add up to $(1 - s + s) b = b$.  So guiding in v, in $\varepsilon$ or in $\hat x_0$ is the same thing.

# %%
unet = UNet2DCondition(pipe.unet_config)
shape = (1, pipe.unet_config.sample_size, pipe.unet_config.sample_size, pipe.unet_config.in_channels)
x_t = jax.random.normal(jax.random.key(0), shape)
t, ab, s = 600, float(pipe.scheduler.noise_schedule().alpha_bar[600]), 7.5
ctx = pipe.encode_text(["a red circle in the top left", ""])
v_c, v_u = (unet.apply({"params": pipe.params["unet"]}, x_t, jnp.full((1,), t), c[None]) for c in ctx)
kind = pipe.scheduler.prediction_type
x0_g, eps_g = split_prediction(v_u + s * (v_c - v_u), x_t, ab, kind)  # guide, then convert
(x0_c, eps_c), (x0_u, eps_u) = split_prediction(v_c, x_t, ab, kind), split_prediction(v_u, x_t, ab, kind)
d_eps = float(jnp.abs(eps_g - (eps_u + s * (eps_c - eps_u))).max())
d_x0 = float(jnp.abs(x0_g - (x0_u + s * (x0_c - x0_u))).max())
print(f"the model predicts {kind}; max difference: in epsilon {d_eps:.1e}, in x0 {d_x0:.1e}")
assert kind == "v_prediction" and d_eps < 1e-4 and d_x0 < 1e-4

# %% [markdown]
# ## 2. Guidance 20
# The guided prediction is an extrapolation $s$ times the prompt's effect past the empty prompt's.
# At $s = 20$ it leaves the range of predictions the model ever made: the black background lights
# up around the shapes and colour channels clip at 255 — the saturated, "burnt" look of too much
# guidance in Stable Diffusion too.

# %%
prompts = ["a red circle in the top left", "a large blue square on the right",
           "a small green triangle in the center", "a yellow circle at the bottom"]
stats = {}
for scale in (1.0, 3.0, 7.5, 20.0):
    images = pipe(prompts, steps=6 if QUICK else 30, seed=0, guidance_scale=scale)
    stats[scale] = (float(images.max(-1).mean()), float(np.mean(images == 255)))
    print(f"guidance {scale:4}: mean brightest channel {stats[scale][0]:5.1f} of 255, "
          f"values clipped at 255 {100 * stats[scale][1]:.2f} %")
assert stats[20.0][0] > 2 * stats[3.0][0] and stats[20.0][1] > 5 * max(stats[3.0][1], 1e-4)
