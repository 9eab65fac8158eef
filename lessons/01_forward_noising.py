# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 1 — The forward process: destroying an image, one small step at a time
#
# A diffusion model learns to undo a fixed, simple corruption.  The corruption is a Markov
# chain that, at every step t, shrinks the image a little and adds a little Gaussian noise:
#
# $$q(x_t \mid x_{t-1}) = \mathcal N\big(\sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big)$$
#
# The variances $\beta_t$ form the *noise schedule*.  Because each step is linear-Gaussian,
# the chain can be collapsed into one jump from the clean image $x_0$ to any $x_t$:
#
# $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t) I\big),
# \qquad \bar\alpha_t = \prod_{s\le t} (1-\beta_s).$$
#
# This lesson checks that claim numerically, watches a photograph dissolve, and compares the
# schedules used by DDPM, Stable Diffusion and "improved DDPM".
#
# Run it as a script (`python lessons/01_forward_noising.py [--quick]`) or open it as a notebook.

# %%
import numpy as np
from _lesson import QUICK, plt, savefig

from minidiff.diffusion import NoiseSchedule, q_sample, q_step
from minidiff.images import example_photo, to_uint8, to_unit_range

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Three schedules
# `NoiseSchedule.from_name` builds $\beta_t$ and precomputes every table the samplers read.

# %%
schedules = {name: NoiseSchedule.from_name(name) for name in ("linear", "scaled_linear", "cosine")}
for name, s in schedules.items():
    print(f"{name:14s} {s}")

# %% [markdown]
# $\bar\alpha_t$ is how much of the signal survives; the signal-to-noise ratio
# $\mathrm{SNR}_t = \bar\alpha_t / (1-\bar\alpha_t)$ says how hard the denoising problem is at t.
# DDPM's linear schedule destroys the image fast and then wastes many steps on pure noise; the
# cosine schedule spreads the destruction evenly; Stable Diffusion's `scaled_linear` (which
# operates on 64×64 latents, not pixels) keeps more signal for longer.

# %%
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
t = np.arange(1000)
for name, s in schedules.items():
    a.plot(t, s.alpha_bar, label=name)
    b.plot(t, np.log(s.snr), label=name)
a.set(title=r"$\bar\alpha_t$ (signal kept)", xlabel="t")
b.set(title=r"$\log\ \mathrm{SNR}_t = \log \bar\alpha_t/(1-\bar\alpha_t)$", xlabel="t")
a.legend()
b.legend()
savefig(fig, "01_schedules.png")

# %% [markdown]
# ## 2. The Markov chain, step by step, against its closed form
# Start many chains from the same $x_0$ and apply `q_step` 1000 times.  At every t the cloud of
# chains should have mean $\sqrt{\bar\alpha_t}x_0$ and variance $1-\bar\alpha_t$.

# %%
s = schedules["linear"]
n_chains = 500 if QUICK else 5000
x0 = 1.5
x = np.full(n_chains, x0)
paths = np.empty((1000, n_chains))
for step in range(1000):
    x = q_step(x, s.betas[step], rng.standard_normal(n_chains))
    paths[step] = x

fig, ax = plt.subplots(figsize=(10, 4))
ax.plot(t, paths[:, :30], lw=0.5, alpha=0.6)
mean, std = s.sqrt_alpha_bar * x0, s.sqrt_one_minus_alpha_bar
ax.plot(t, mean, "k", lw=2, label=r"closed form mean $\sqrt{\bar\alpha_t}\,x_0$")
ax.fill_between(t, mean - 2 * std, mean + 2 * std, color="k", alpha=0.1, label=r"$\pm 2\sqrt{1-\bar\alpha_t}$")
ax.set(title=f"{n_chains} chains from x0 = {x0} (30 drawn)", xlabel="t", ylabel="x_t")
ax.legend()
savefig(fig, "01_markov_chain.png")

for step in (9, 99, 499, 999):
    se_mean, se_var = np.sqrt((1 - s.alpha_bar[step]) / n_chains), (1 - s.alpha_bar[step]) * np.sqrt(2 / n_chains)
    print(f"t={step:4d}  mean {paths[step].mean():+.3f} vs {mean[step]:+.3f} (±{se_mean:.3f})   "
          f"var {paths[step].var():.3f} vs {1 - s.alpha_bar[step]:.3f} (±{se_var:.3f})")

# %% [markdown]
# ## 3. A photograph dissolving
# Pixels are scaled to $[-1, 1]$.  With the closed form we can jump straight to any t.
# The top row uses one noise draw $\varepsilon$ for all t (the same noise, growing); the bottom
# row runs the actual Markov chain, step by step — different noise, the same distribution.

# %%
photo = to_unit_range(example_photo("chelsea", size=64 if QUICK else 160))
show_t = [0, 25, 50, 100, 200, 400, 700, 999]
eps = rng.standard_normal(photo.shape)
closed = [q_sample(photo, s.alpha_bar[k], eps) for k in show_t]
chain, xk = [], photo
for step in range(1000):
    xk = q_step(xk, s.betas[step], rng.standard_normal(photo.shape))
    if step in show_t:
        chain.append(xk)

fig, axes = plt.subplots(2, len(show_t), figsize=(2 * len(show_t), 4.4))
for j, k in enumerate(show_t):
    axes[0, j].imshow(to_uint8(closed[j]))
    axes[1, j].imshow(to_uint8(chain[j]))
    axes[0, j].set_title(f"t = {k}\n" + r"$\bar\alpha_t$" + f" = {s.alpha_bar[k]:.3f}", fontsize=9)
for ax in axes.flat:
    ax.axis("off")
axes[0, 0].text(-0.1, 0.5, "closed form", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
axes[1, 0].text(-0.1, 0.5, "Markov chain", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
savefig(fig, "01_photo_noising.png")

# %% [markdown]
# ## 4. The same t, three schedules
# At the same t the schedules leave very different amounts of the picture.

# %%
fig, axes = plt.subplots(3, 5, figsize=(10, 6.4))
for i, (name, sc) in enumerate(schedules.items()):
    for j, k in enumerate([100, 250, 500, 750, 900]):
        axes[i, j].imshow(to_uint8(q_sample(photo, sc.alpha_bar[k], eps)))
        axes[i, j].set_title(f"{name}, t={k}", fontsize=8)
        axes[i, j].axis("off")
savefig(fig, "01_schedules_on_photo.png")

# %% [markdown]
# **Takeaways.** One forward step is a tiny shrink-and-add-noise; the closed form lets training
# jump to any t in one line (`q_sample`); the schedule decides how quickly information is lost.
# Lesson 2 runs the chain backwards.

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/01_forward_noising.py`.
#
# 1. **The closed form by induction.** Assume $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\,x_0 + \sqrt{1-\bar\alpha_{t-1}}\,\varepsilon'$ and take
#    one more step.  Show that the result has the closed form at t (hint: the sum of two independent
#    Gaussians), then check it with 100,000 two-step chains against `q_sample`.
# 2. **Where does half the signal go?** For each of the three schedules find the t at which
#    $\mathrm{SNR}_t = 1$ ($\bar\alpha_t = 1/2$), and the last t at which $\mathrm{SNR}_t > 10^{-3}$.  Which schedule
#    spends the most steps on almost pure noise?
# 3. **What goes wrong if** the pictures are not scaled to $[-1, 1]$ but left in $[0, 255]$?  Sampling starts
#    from $x_T \sim \mathcal N(0, I)$; compute, for a pixel of value 255, how far $q(x_T \mid x_0)$ is from that
#    start ($\mathrm{KL}$ of the two Gaussians) with each scaling, for the linear and `scaled_linear` schedules.

