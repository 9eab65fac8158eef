# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 1 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import numpy as np  # noqa: E402

from minidiff.diffusion import NoiseSchedule, q_sample, q_step  # noqa: E402

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The closed form by induction
# One step gives $x_t = \sqrt{\alpha_t}\,x_{t-1} + \sqrt{\beta_t}\,\varepsilon_t = \sqrt{\alpha_t\bar\alpha_{t-1}}\,x_0 + \sqrt{\alpha_t(1-\bar\alpha_{t-1})}\,\varepsilon' + \sqrt{\beta_t}\,\varepsilon_t$.
# The two noise terms are independent zero-mean Gaussians, so their sum is one Gaussian whose
# variance is the sum, $\alpha_t(1-\bar\alpha_{t-1}) + \beta_t = \alpha_t - \bar\alpha_t + 1 - \alpha_t = 1 - \bar\alpha_t$, and the mean
# coefficient is $\sqrt{\alpha_t\bar\alpha_{t-1}} = \sqrt{\bar\alpha_t}$: the closed form at t.  With $\bar\alpha_0 = \alpha_0$ the induction starts.
# Checked: two steps of the chain (from t = 299 to 301) against one jump, by mean and variance
# (tolerances: 4 standard errors of each estimate).

# %%
s = NoiseSchedule.from_name("linear")
n, x0, t = 100_000, 0.8, 301
x_prev = q_sample(np.full(n, x0), s.alpha_bar[t - 2], rng.standard_normal(n))
two_steps = q_step(q_step(x_prev, s.betas[t - 1], rng.standard_normal(n)), s.betas[t], rng.standard_normal(n))
mean, var = np.sqrt(s.alpha_bar[t]) * x0, 1 - s.alpha_bar[t]
print(f"two steps: mean {two_steps.mean():.4f} (closed form {mean:.4f}), var {two_steps.var():.4f} (closed form {var:.4f})")
assert abs(two_steps.mean() - mean) < 4 * np.sqrt(var / n)
assert abs(two_steps.var() - var) < 4 * var * np.sqrt(2 / n)

# %% [markdown]
# ## 2. Where does half the signal go?
# DDPM's linear schedule reaches SNR = 1 earliest and then spends the most steps with almost no
# signal left (SNR below $10^{-3}$, 174 of its 1000 steps): those steps teach the network little.
# The cosine schedule was designed (Nichol & Dhariwal 2021) to fix exactly that: it keeps SNR above
# 1 longest and has only about 20 such steps.  SD's `scaled_linear` never gets that low at all: its
# $x_T$ still holds a little signal (Exercise 3), one reason SD cannot draw very dark or very bright
# pictures (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed").

# %%
schedules = {name: NoiseSchedule.from_name(name) for name in ("linear", "scaled_linear", "cosine")}
half, last = {}, {}
for name, sc in schedules.items():
    half[name] = int(np.argmax(sc.snr < 1))
    above = np.flatnonzero(sc.snr > 1e-3)
    last[name] = int(above[-1])
    print(f"{name:14s} SNR = 1 at t = {half[name]:4d}; SNR > 1e-3 until t = {last[name]:4d} "
          f"({999 - last[name]} steps of almost pure noise)")
assert half["linear"] < half["cosine"] and half["linear"] < half["scaled_linear"]
assert 999 - last["linear"] == max(999 - v for v in last.values())

# %% [markdown]
# ## 3. Pictures in [0, 255]
# $q(x_T \mid x_0) = \mathcal N(\sqrt{\bar\alpha_T}\,x_0, 1-\bar\alpha_T)$, and the KL to $\mathcal N(0, 1)$ is
# $\frac12\big(\bar\alpha_T x_0^2 + (1-\bar\alpha_T) - 1 - \log(1-\bar\alpha_T)\big) \approx \frac12\bar\alpha_T x_0^2$.  In $[-1, 1]$ the
# leftover signal is negligible; in $[0, 255]$ a bright pixel keeps a mean of $\sqrt{\bar\alpha_T}\cdot 255$, about
# 1.6 standard deviations for the linear schedule and 17 for `scaled_linear`: the sampler would
# start from a distribution the model never saw at t = T, and every picture would come out biased
# (the schedule assumes data of unit scale — which is also why latents are scaled, lesson 7).


# %%
def kl_to_standard_normal(mean, var):
    return 0.5 * (mean**2 + var - 1 - np.log(var))


kl = {}
for name in ("linear", "scaled_linear"):
    ab = schedules[name].alpha_bar[-1]
    for scale, pixel in (("[-1, 1]", 1.0), ("[0, 255]", 255.0)):
        kl[name, scale] = kl_to_standard_normal(np.sqrt(ab) * pixel, 1 - ab)
        print(f"{name:14s} {scale:9s}: mean of x_T {np.sqrt(ab) * pixel:7.3f}, KL to N(0,1) {kl[name, scale]:.2e} nats")
    assert kl[name, "[-1, 1]"] < 0.01 and kl[name, "[0, 255]"] > 1
