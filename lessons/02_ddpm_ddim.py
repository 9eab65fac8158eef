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
from minidiff.metrics import sliced_wasserstein

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
# ## 2. Where $\tilde\mu_t$ and $\tilde\beta_t$ come from (Bayes, step by step)
# DDPM's step needs the posterior of the forward chain, $q(x_{t-1} \mid x_t, x_0)$.  By Bayes, and
# because the chain is Markov ($x_t$ depends on $x_0$ only through $x_{t-1}$):
#
# $$q(x_{t-1} \mid x_t, x_0) \propto q(x_t \mid x_{t-1})\, q(x_{t-1} \mid x_0)
#   = \mathcal N(x_t;\ \sqrt{\alpha_t}\,x_{t-1},\ \beta_t)\ \mathcal N(x_{t-1};\ \sqrt{\bar\alpha_{t-1}}\,x_0,\ 1-\bar\alpha_{t-1}).$$
#
# As functions of $x_{t-1}$ both factors are Gaussians: the first has precision $\alpha_t/\beta_t$
# and "precision times mean" $\sqrt{\alpha_t}\,x_t/\beta_t$; the second precision $1/(1-\bar\alpha_{t-1})$
# and precision times mean $\sqrt{\bar\alpha_{t-1}}\,x_0/(1-\bar\alpha_{t-1})$.  A product of Gaussians
# adds precisions and precision-weighted means:
#
# $$\frac1{\tilde\beta_t} = \frac{\alpha_t}{\beta_t} + \frac1{1-\bar\alpha_{t-1}}
#   = \frac{\alpha_t(1-\bar\alpha_{t-1}) + \beta_t}{\beta_t(1-\bar\alpha_{t-1})}
#   = \frac{1-\bar\alpha_t}{\beta_t(1-\bar\alpha_{t-1})}
#   \quad\Rightarrow\quad \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\,\beta_t$$
#
# (using $\alpha_t + \beta_t = 1$ and $\alpha_t\bar\alpha_{t-1} = \bar\alpha_t$), and
#
# $$\tilde\mu_t = \tilde\beta_t\Big(\frac{\sqrt{\alpha_t}}{\beta_t}x_t + \frac{\sqrt{\bar\alpha_{t-1}}}{1-\bar\alpha_{t-1}}x_0\Big)
#   = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1-\bar\alpha_t}\,x_0 + \frac{\sqrt{\alpha_t}\,(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}\,x_t .$$
#
# These are the coefficients `q_posterior` uses.  The check below does Bayes by brute force: the
# product of the two densities on a fine grid of $x_{t-1}$, normalised, its mean and variance.

# %%
from minidiff.diffusion import q_posterior  # noqa: E402


def gauss(x, mean, var):
    return np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)


grid_x = np.linspace(-6, 6, 200_001)
dx = grid_x[1] - grid_x[0]
print("  t   x0    x_t   mean (grid)  mean (formula)   var (grid)   var (formula)")
for t, x0_, xt_ in [(10, 1.5, 1.2), (300, -0.7, 0.4), (900, 2.0, -1.0)]:
    ab_t, ab_prev, beta_t = sched.alpha_bar[t], sched.alpha_bar[t - 1], sched.betas[t]
    density = gauss(xt_, np.sqrt(1 - beta_t) * grid_x, beta_t) * gauss(grid_x, np.sqrt(ab_prev) * x0_, 1 - ab_prev)
    density /= density.sum() * dx
    m_grid = (grid_x * density).sum() * dx
    v_grid = ((grid_x - m_grid) ** 2 * density).sum() * dx
    m, v = q_posterior(np.array([x0_]), np.array([xt_]), ab_t, ab_prev)
    m, v = m[0], float(np.ravel(v)[0])
    print(f"{t:4d} {x0_:5.1f} {xt_:5.1f}   {m_grid:10.6f}   {m:10.6f}     {v_grid:.3e}    {v:.3e}")
    assert abs(m_grid - m) < 1e-4 and abs(v_grid / v - 1) < 1e-3, "the posterior formula disagrees with Bayes"

# %% [markdown]
# ## 3. From the ELBO to the simple loss
# Training maximises the evidence lower bound.  Its terms for $t > 1$ are
# $L_{t-1} = \mathrm{KL}\big(q(x_{t-1}\mid x_t, x_0)\ \|\ p_\theta(x_{t-1}\mid x_t)\big)$ with the model
# $p_\theta = \mathcal N(\mu_\theta(x_t, t), \sigma_t^2)$.  Between two Gaussians of the same
# variance the KL is the squared distance of the means: $L_{t-1} = \|\tilde\mu_t - \mu_\theta\|^2 / 2\sigma_t^2$
# (with $\sigma_t^2 = \tilde\beta_t$).  Write the model's mean as the posterior mean at the
# predicted clean sample $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon)/\sqrt{\bar\alpha_t}$;
# only the $x_0$ coefficient differs, and $x_0 - \hat x_0 = \sqrt{1-\bar\alpha_t}\,(\hat\varepsilon - \varepsilon)/\sqrt{\bar\alpha_t}$, so
#
# $$L_{t-1} = \underbrace{\frac{\beta_t^2}{2\sigma_t^2\,\alpha_t\,(1-\bar\alpha_t)}}_{\lambda_t}\ \|\varepsilon - \hat\varepsilon_\theta(x_t, t)\|^2 .$$
#
# Ho et al. drop $\lambda_t$ ("the simple loss", $\|\varepsilon - \hat\varepsilon\|^2$ at a uniform
# random $t$): it weights the hard, noisy timesteps more than the ELBO would, and samples better.
# Below, the KL computed from the two Gaussians' means equals $\lambda_t\|\varepsilon - \hat\varepsilon\|^2$,
# and the plot shows how far $\lambda_t$ is from constant.

# %%
x0_b, eps_true, eps_hat = rng.standard_normal((3, 64, 2))
for t in (5, 100, 700):
    ab_t, ab_prev, beta_t = sched.alpha_bar[t], sched.alpha_bar[t - 1], sched.betas[t]
    xt_b = q_sample(x0_b, ab_t, eps_true)
    mu_true, var = q_posterior(x0_b, xt_b, ab_t, ab_prev)
    mu_model, _ = q_posterior((xt_b - np.sqrt(1 - ab_t) * eps_hat) / np.sqrt(ab_t), xt_b, ab_t, ab_prev)
    var = float(np.ravel(var)[0])
    kl = ((mu_true - mu_model) ** 2).sum(1) / (2 * var)
    lam = beta_t**2 / (2 * var * (1 - beta_t) * (1 - ab_t))
    simple = ((eps_true - eps_hat) ** 2).sum(1)
    print(f"t={t:4d}: KL / ||eps - eps_hat||^2 = {np.mean(kl / simple):.5f}, lambda_t = {lam:.5f}")
    assert np.allclose(kl, lam * simple, rtol=1e-6), "the ELBO term is not lambda_t times the simple loss"
ts = np.arange(2, sched.num_train_timesteps)
lam_t = sched.betas[ts] ** 2 / (2 * sched.posterior_variance[ts] * (1 - sched.betas[ts]) * (1 - sched.alpha_bar[ts]))
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.semilogy(ts, lam_t)
ax.set(xlabel="timestep t", ylabel="$\\lambda_t$", title="The ELBO's weight on $||\\varepsilon-\\hat\\varepsilon||^2$ (the simple loss uses 1)")
savefig(fig, "02_elbo_weight.png")

# %% [markdown]
# ## 4. DDPM with 1000 steps vs DDIM with 50

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
# ## 5. Trajectories
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
# ## 6. How many steps?
# We measure the distance between generated points and fresh data with the sliced Wasserstein
# distance (the average 1-D optimal-transport distance over random projections,
# `minidiff.metrics.sliced_wasserstein`).  The dashed
# line is the distance between two independent data samples of the same size: the floor.

# %%
directions = rng.standard_normal((64, 2))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)



steps_list = [5, 10, 25, 50] if QUICK else [5, 10, 20, 50, 100, 200, 500, 1000]
repeats = 3 if QUICK else 5  # independent runs per point: the error bars are their standard error
reference, _ = gm.sample(n, rng)
floors = [sliced_wasserstein(gm.sample(n, rng)[0], reference, directions) for _ in range(repeats)]
curves = {"DDIM eta=0": [], "DDIM eta=1 (= DDPM)": []}
for N in steps_list:
    isc = InferenceSchedule.create(sched, N)
    curves["DDIM eta=0"].append(
        [sliced_wasserstein(sample(eps_theta, rng.standard_normal((n, 2)), isc, "ddim"), reference, directions)
         for _ in range(repeats)])
    curves["DDIM eta=1 (= DDPM)"].append(
        [sliced_wasserstein(sample(eps_theta, rng.standard_normal((n, 2)), isc, "ddpm", rng=rng), reference, directions)
         for _ in range(repeats)])
fig, ax = plt.subplots(figsize=(7, 4))
for name, c in curves.items():
    c = np.array(c)
    ax.errorbar(steps_list, c.mean(1), yerr=c.std(1, ddof=1) / np.sqrt(repeats), fmt="o-", capsize=3, label=name)
ax.axhline(np.mean(floors), ls="--", color="gray", label="two data samples")
ax.set(xscale="log", xlabel="sampling steps N", ylabel="sliced Wasserstein distance to data",
       title=f"Distance to the data vs steps (mixture oracle, n = {n} points, mean ± s.e. of {repeats} runs)")
ax.legend()
savefig(fig, "02_steps_vs_quality.png")
for N, a, b in zip(steps_list, *curves.values()):
    print(f"N={N:5d}   DDIM {np.mean(a):.4f} ± {np.std(a, ddof=1) / np.sqrt(repeats):.4f}   "
          f"DDPM {np.mean(b):.4f} ± {np.std(b, ddof=1) / np.sqrt(repeats):.4f}   (floor {np.mean(floors):.4f})")

# %% [markdown]
# ## 7. DDIM inversion
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

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/02_ddpm_ddim.py`.
#
# 1. **Posterior vs forward variance.** Show from the formula in §2 that $\tilde\beta_t \le \beta_t$, with
#    near-equality when $\bar\alpha_{t-1} \to 0$.  Check it on SD's `scaled_linear` schedule: at which
#    t is $\tilde\beta_t$ less than half of $\beta_t$?
# 2. **Between DDIM and DDPM.** Sample the mixture with DDIM at $\eta \in \{0, 0.5, 1\}$ with 10 and
#    with 100 steps (`sample(..., "ddim", eta=...)`).  Which $\eta$ is closest to the data (sliced
#    Wasserstein, with error bars from repeats) at 10 steps, and does the ranking hold at 100?
# 3. **What goes wrong if** the reverse step uses the forward variance $\beta_t$ instead of
#    $\tilde\beta_t$ (`variance="beta"`)?  Compare the spread (covariance) of the samples with the
#    data's at 1000 steps and at 25 steps.  Which choice is right at 25 steps, and why is the other
#    one wrong there although it is the exact posterior variance?

