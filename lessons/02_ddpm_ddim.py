# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 2 — Running the chain backwards: DDPM and DDIM
#
# To generate, we start from pure noise $x_T \sim \mathcal N(0, I)$ and walk the forward chain
# in reverse.  Everything a sampler needs is one function, the **noise predictor**
# $\varepsilon_\theta(x_t, t) \approx \mathbb E[\varepsilon \mid x_t]$.  Normally a network learns it.
# Here the data is a Gaussian mixture, for which the *exact* predictor has a closed form
# (`GaussianMixture.eps_oracle`), so every error we see belongs to the sampler alone.
#
# - **DDPM** (ancestral): $x_{t-1} = \tilde\mu_t(x_t, \hat x_0) + \sigma_t z$, a fresh Gaussian $z$
#   at every step; needs ~1000 small steps.
# - **DDIM**: $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\hat\varepsilon + \sigma_t z$,
#   with $\sigma_t = \eta\sqrt{\tilde\beta_t}$.  With $\eta = 0$ it is deterministic and works with
#   few, large steps; with $\eta = 1$ it is exactly the DDPM step.

# %%
import numpy as np
from _lesson import QUICK, plt, savefig

from minidiff.data import TOY_MIXTURE as gm
from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_invert, q_sample, sample

rng = np.random.default_rng(0)
sched = NoiseSchedule.from_name("linear")
n = 1000 if QUICK else 5000


def eps_theta(x, t):
    """The exact noise predictor E[eps | x_t] of the mixture at timestep t."""
    return gm.eps_oracle(x, sched.alpha_bar[t])


data, _ = gm.sample(n, rng)

# %% [markdown]
# ## 1. What the predictor knows
# At each point $x_t$ the arrow is $-\hat\varepsilon$: the direction in which the noise is removed.
# Early in the reverse process (large t) the arrows point to the centre of the whole mixture;
# late (small t) each arrow points to its nearest component.

# %%
g = np.linspace(-4, 4, 21)
X, Y = np.meshgrid(g, g)
grid = np.stack([X.ravel(), Y.ravel()], 1)
fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
for ax, t in zip(axes, (800, 250, 30)):
    xt = q_sample(data, sched.alpha_bar[t], rng.standard_normal(data.shape))
    e = eps_theta(grid, t)
    ax.scatter(xt[:, 0], xt[:, 1], s=1, alpha=0.3, color="C1")
    ax.quiver(grid[:, 0], grid[:, 1], -e[:, 0], -e[:, 1], color="k", alpha=0.7)
    ax.set(title=f"t = {t}: samples of x_t and $-\\hat\\varepsilon(x_t)$", xlim=(-4, 4), ylim=(-4, 4))
    ax.set_aspect("equal")
savefig(fig, "02_noise_field.png")

# %% [markdown]
# ## 2. DDPM with 1000 steps vs DDIM with 50

# %%
ddpm_steps = 250 if QUICK else 1000
runs = {
    f"DDPM, {ddpm_steps} steps": sample(eps_theta, rng.standard_normal((n, 2)),
                                        InferenceSchedule.create(sched, ddpm_steps), "ddpm", rng=rng),
    "DDIM (eta=0), 50 steps": sample(eps_theta, rng.standard_normal((n, 2)), InferenceSchedule.create(sched, 50), "ddim"),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), sharex=True, sharey=True)
for ax, (title, pts) in zip(axes, {"data": data, **runs}.items()):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
    ax.set_title(title)
    ax.set_aspect("equal")
savefig(fig, "02_ddpm_vs_ddim.png")

for title, pts in runs.items():
    k = gm.responsibilities(pts).argmax(1)
    print(f"{title:24s} weights {np.round(np.bincount(k, minlength=3) / len(pts), 3)}  (true {gm.weights})")

# %% [markdown]
# ## 3. Trajectories
# Twelve starting points run by DDIM (smooth, deterministic: an ODE), and four of them by DDPM
# (a new random kick at every step: an SDE).  Both end on the data.

# %%
start = rng.standard_normal((12, 2)) * 1.5
_, traj_ddim = sample(eps_theta, start, InferenceSchedule.create(sched, 50), "ddim", return_trajectory=True)
_, traj_ddpm = sample(eps_theta, start, InferenceSchedule.create(sched, ddpm_steps), "ddpm", rng=rng,
                      return_trajectory=True)
fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
panels = ((axes[0], np.stack(traj_ddim), "DDIM, eta = 0", 0.8), (axes[1], np.stack(traj_ddpm)[:, :4], "DDPM", 0.5))
for ax, traj, title, lw in panels:  # traj: (steps + 1, points, 2)
    ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.15, color="gray")
    for j in range(traj.shape[1]):
        ax.plot(traj[:, j, 0], traj[:, j, 1], lw=lw)
        ax.plot(*traj[0, j], "k.", ms=6)
        ax.plot(*traj[-1, j], "r*", ms=8)
    ax.set_title(f"{title} (black: x_T, red: x_0)")
    ax.set_aspect("equal")
savefig(fig, "02_trajectories.png")

# %% [markdown]
# ## 4. How many steps?
# We measure the distance between generated points and fresh data with the sliced Wasserstein
# distance (the average 1-D optimal-transport distance over random projections).  The dashed
# line is the distance between two independent data samples of the same size: the floor.

# %%
directions = rng.standard_normal((64, 2))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)


def sliced_wasserstein(a, b):
    pa, pb = np.sort(a @ directions.T, axis=0), np.sort(b @ directions.T, axis=0)
    return np.mean(np.abs(pa - pb))


steps_list = [5, 10, 25, 50] if QUICK else [5, 10, 20, 50, 100, 200, 500, 1000]
reference, _ = gm.sample(n, rng)
floor = sliced_wasserstein(gm.sample(n, rng)[0], reference)
curves = {"DDIM eta=0": [], "DDIM eta=1 (= DDPM)": []}
for N in steps_list:
    isc = InferenceSchedule.create(sched, N)
    curves["DDIM eta=0"].append(sliced_wasserstein(sample(eps_theta, rng.standard_normal((n, 2)), isc, "ddim"), reference))
    curves["DDIM eta=1 (= DDPM)"].append(
        sliced_wasserstein(sample(eps_theta, rng.standard_normal((n, 2)), isc, "ddpm", rng=rng), reference))
fig, ax = plt.subplots(figsize=(7, 4))
for name, c in curves.items():
    ax.plot(steps_list, c, "o-", label=name)
ax.axhline(floor, ls="--", color="gray", label="two data samples")
ax.set(xscale="log", xlabel="sampling steps N", ylabel="sliced Wasserstein distance to data",
       title="Deterministic DDIM needs far fewer steps")
ax.legend()
savefig(fig, "02_steps_vs_quality.png")
for N, a, b in zip(steps_list, *curves.values()):
    print(f"N={N:5d}   DDIM {a:.4f}   DDPM {b:.4f}   (floor {floor:.4f})")

# %% [markdown]
# ## 5. DDIM inversion
# Because the $\eta=0$ chain is deterministic it can be run *upwards*: data → latent noise →
# data again.  The round trip is exact up to the approximation
# $\varepsilon(x_{t_{prev}}, t) \approx \varepsilon(x_t, t)$, so its error shrinks with the step size.

# %%
x0, _ = gm.sample(500, rng)
errors = []
inv_steps = [10, 25, 50] if QUICK else [10, 25, 50, 100, 200, 500]
for N in inv_steps:
    isc = InferenceSchedule.create(sched, N)
    xT = ddim_invert(eps_theta, x0, isc)
    errors.append(np.sqrt(np.mean((sample(eps_theta, xT, isc, "ddim") - x0) ** 2)))
fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
axes[0].loglog(inv_steps, errors, "o-")
axes[0].set(xlabel="steps N", ylabel="RMS error of x0 -> x_T -> x0", title="Inversion error ~ 1/N")
axes[1].scatter(x0[:, 0], x0[:, 1], s=3, label="x0")
axes[1].scatter(xT[:, 0], xT[:, 1], s=3, label=f"inverted x_T ({inv_steps[-1]} steps)")
axes[1].set_aspect("equal")
axes[1].legend()
savefig(fig, "02_inversion.png")
for N, e in zip(inv_steps, errors):
    print(f"inversion with {N:4d} steps: RMS round-trip error {e:.4f}")

# %% [markdown]
# **Takeaways.** With a perfect noise predictor, DDPM needs many small stochastic steps, while
# deterministic DDIM gets close in 50; DDIM's determinism also gives an encoder (inversion).
# Stable Diffusion runs exactly these step functions, with a UNet in place of the oracle.
