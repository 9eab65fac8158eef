# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 7 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.diffusion import NoiseSchedule  # noqa: E402
from minidiff.pipeline import load_pipeline  # noqa: E402

# %% [markdown]
# ## 1. Decoding at the wrong scale
# The decoder was trained on latents of one scale.  Divided by 0.18215 (5.5 times too large) the
# latent lies far outside anything the decoder saw: the black background turns a muddy grey-green
# and the shapes blow out into yellow-white blobs with dark halos.  Multiplied by it (5.5 times too
# small) the decoder sees "almost the zero latent": black pictures with faint, shrunken smudges
# where the shapes were.  Every network is right and the picture is wrong — which is why a
# converted model must carry its VAE's `scaling_factor` (minidiff reads it from the checkpoint's
# config, e.g. 0.13025 for SDXL).

# %%
pipe = load_pipeline()
z = pipe.sample_latents(["a red circle in the top left", "a large blue square on the right"], steps=6 if QUICK else 30,
                        seed=0)
print(f"the built-in model's scaling factor: {pipe.vae_config.scaling_factor}")
right, too_big, too_small = pipe.decode(z), pipe.decode(z / 0.18215), pipe.decode(z * 0.18215)
background = right.max(-1) < 20  # black in the correct picture
shape_area = lambda im: float(np.mean(im.max(-1) > 60))  # noqa: E731  fraction of clearly coloured pixels
for name, im in (("correct", right), ("/ 0.18215", too_big), ("x 0.18215", too_small)):
    print(f"{name:10s}: background brightness {im[background].mean():5.1f} of 255, coloured area {100 * shape_area(im):4.1f} %")
assert too_big[background].mean() > 40 > right[background].mean() + 20
assert shape_area(too_small) < 0.5 * shape_area(right)

# %% [markdown]
# ## 2. Forgetting the factor when encoding
# Unscaled latents have variance $1/s^2$ instead of 1, so at every timestep the SNR is $1/s^2$ times
# too high — about 30 for SD's 0.18215.  Strength 0.6 starts at t of about 600; there the UNet would
# see the SNR that the correct pipeline has at a much lower t, i.e. a much weaker strength: the
# result would stay close to the input picture whatever strength the user asks for, and the model
# would be denoising inputs off the distribution it was trained on.

# %%
sd = NoiseSchedule.from_name("scaled_linear")
factor = 0.18215
t_start = round(0.6 * 1000) - 1
snr_wrong = sd.snr[t_start] / factor**2
t_same = int(np.argmin(np.abs(np.log(sd.snr) - np.log(snr_wrong))))
print(f"strength 0.6 (t = {t_start}): SNR {sd.snr[t_start]:.3f} correct, {snr_wrong:.2f} without the factor "
      f"= the correct pipeline's SNR at t = {t_same}, i.e. strength ~ {(t_same + 1) / 1000:.2f}")
assert snr_wrong > 25 * sd.snr[t_start]
assert (t_same + 1) / 1000 < 0.35
