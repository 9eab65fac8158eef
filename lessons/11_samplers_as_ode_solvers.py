# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 11 — Samplers as ODE solvers
#
# Divide $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ by $\sqrt{\bar\alpha_t}$:
#
# $$x = \frac{x_t}{\sqrt{\bar\alpha_t}} = x_0 + \sigma\,\varepsilon, \qquad
#   \sigma = \sqrt{\frac{1-\bar\alpha_t}{\bar\alpha_t}}, \qquad \bar\alpha = \frac{1}{1+\sigma^2}.$$
#
# In this *sigma view* the forward process only adds noise of scale $\sigma$, and generating is
# solving the **probability-flow ODE** (Song et al. 2021; Karras et al. 2022, eq. 4 with $\sigma(t)=t$)
#
# $$\frac{dx}{d\sigma} = \frac{x - D(x;\sigma)}{\sigma} = \hat\varepsilon(x, \sigma),$$
#
# with $D = \hat x_0$ the denoiser, from $\sigma_{max}$ down to $0$.  Every deterministic sampler
# is a numerical method for this one ODE; they differ only in how they use the slopes they have
# paid for (one network call each).  This lesson measures that with the *exact* noise predictor of
# lesson 2's mixture, so the only error left is the solver's, then runs the built-in mini SD.
#
# | idea | file |
# |---|---|
# | the sigma view, Karras / exponential grids | `minidiff/diffusion/sigmas.py` |
# | Euler, Euler a, Heun, LMS | `minidiff/diffusion/k_samplers.py` |
# | DPM-Solver++ 2M, UniPC | `minidiff/diffusion/dpm_solver.py` |
# | PLMS (SD 1.5's PNDM) | `minidiff/diffusion/plms.py` |
# | every sampler by name: tables, init, step | `minidiff/diffusion/solvers.py` |

# %%
import time

import numpy as np
from _lesson import QUICK, plt, savefig

from minidiff.data import TOY_MIXTURE as gm
from minidiff.diffusion import InferenceSchedule, NoiseSchedule, sample
from minidiff.diffusion import solvers
from minidiff.diffusion.sigmas import (karras_sigmas, sigma_from_alpha_bar, sigma_grid, timestep_from_sigma,
                                       to_sigma_space)
from minidiff.diffusion.solvers import SOLVERS

t_start = time.perf_counter()
rng = np.random.default_rng(0)
sched = NoiseSchedule.from_name("scaled_linear")  # Stable Diffusion's betas
train_sigmas = sigma_from_alpha_bar(np.asarray(sched.alpha_bar, np.float64))  # sigma(t), t = 0..999
print(f"SD's schedule: sigma runs from {train_sigmas[0]:.4f} (t = 0) to {train_sigmas[-1]:.2f} (t = 999)")


def predict(x, t):
    """The exact eps_hat of the mixture at the (fractional) timestep t: sigma(t) interpolated in
    log sigma between training steps, the inverse of ``timestep_from_sigma``."""
    sigma = np.exp(np.interp(t, np.arange(len(train_sigmas)), np.log(train_sigmas)))
    return gm.eps_oracle(x, 1 / (1 + sigma**2))


def exact_t(tables):
    """A network only knows t (diffusers rounds DPM-Solver's Karras timesteps to integers); the oracle
    knows every noise level, so give each row the exact t of the sigma its step assumes."""
    tables = dict(tables)
    if "sigma" in tables:  # k_samplers.py: Euler, Euler a, Heun, LMS
        tables["t"] = timestep_from_sigma(tables["sigma"], train_sigmas)
    if "sigma_2" in tables:  # Heun's second call
        tables["t_2"] = timestep_from_sigma(tables["sigma_2"], train_sigmas)
    if "ab" in tables:  # dpm_solver.py: alpha_bar at the step's start
        tables["t"] = timestep_from_sigma(sigma_from_alpha_bar(tables["ab"]), train_sigmas)
    return tables


def tables_for(name, n, sigmas="default", spacing="linspace"):
    """SOLVERS[name]'s per-step tables on SD's schedule, "linspace" spacing: every grid starts at t = 999."""
    return exact_t(SOLVERS[name].tables(sched, n, sigmas, spacing, 0))


def trajectory(name, x, tables, noise=None):
    """solvers.run, keeping every x (VP space) and the sigma it sits at."""
    solver, state, xs = SOLVERS[name], SOLVERS[name].init(x), [x]
    for i in range(len(tables["t"])):
        row = {k: v[i] for k, v in tables.items()}
        x, state = solver.step(predict, x, state, row, None if noise is None else noise[i])
        xs.append(x)
    return xs


# %% [markdown]
# ## 1. DDIM is Euler
#
# Euler's method follows the slope at the start of each step:
# $x_{i+1} = x_i + (\sigma_{i+1} - \sigma_i)\,\hat\varepsilon(x_i, \sigma_i)$
# (`k_samplers.euler_step`).  DDIM with $\eta = 0$,
# $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1-\bar\alpha_{t'}}\,\hat\varepsilon$, divided by
# $\sqrt{\bar\alpha_{t'}}$ reads $x_{i+1} = \hat x_0 + \sigma_{i+1}\hat\varepsilon
# = x_i + (\sigma_{i+1} - \sigma_i)\hat\varepsilon$: the same step.  The two agree on the same grid,
# *including its end*: DDIM's last step goes to $\bar\alpha = 1$ (`set_alpha_to_one=True`), i.e.
# $\sigma_N = 0$ (the grid's `final="zero"`); SD's `set_alpha_to_one=False` stops at
# $\bar\alpha_0$, the grid with `final="sigma_min"` (`tests/test_k_samplers.py`).

# %%
x_T = rng.standard_normal((400 if QUICK else 2000, 2))  # the VP x_T, as a pipeline draws it
for spacing, offset, n in (("linspace", 0, 10), ("leading", 1, 20)):
    isc = InferenceSchedule.create(sched, n, spacing, offset, set_alpha_to_one=True)
    euler = solvers.run(SOLVERS["euler"], predict, x_T, SOLVERS["euler"].tables(sched, n, "default", spacing, offset))
    ddim = sample(predict, x_T, isc, "ddim")
    print(f"{n} steps, {spacing:8s} spacing: max |DDIM - Euler| = {np.abs(ddim - euler).max():.1e}"
          f"  (|x0| up to {np.abs(ddim).max():.1f})")

# %% [markdown]
# The picture: one coordinate of $x = x_t/\sqrt{\bar\alpha}$ against $\sigma$.  Euler (= DDIM) moves
# along the tangent, in straight lines in $(\sigma, x)$; the exact path (a 1000-step solution of the
# same ODE from the same $x_T$) bends, and the bending happens at small $\sigma$.

# %%
# the reference: DPM-Solver++ 2M with 1000 log-uniform steps over all the training sigmas
# (exponential sigmas span the training range whatever the spacing; "linspace" would need 1001 timesteps)
ref_tables = tables_for("dpmpp_2m", 1000, "exponential", "trailing")
few = x_T[:6]
ref_path = trajectory("dpmpp_2m", few, ref_tables)
ref_sig = np.append(sigma_from_alpha_bar(ref_tables["ab"]), 0.0)
e_tables = tables_for("euler", 10)
e_path = trajectory("euler", few, e_tables)
e_sig = np.append(e_tables["sigma"], 0.0)
_, ddim_path = sample(predict, few, InferenceSchedule.create(sched, 10, "linspace", 0, True), "ddim",
                      return_trajectory=True)
sigma_space = lambda xs, s: np.stack([to_sigma_space(x, np.full(len(x), v)) for x, v in zip(xs, s)])  # noqa: E731
fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
for ax, lim in zip(axes, (None, 1.5)):
    for j in range(len(few)):
        ax.plot(ref_sig, sigma_space(ref_path, ref_sig)[:, j, 0], color=f"C{j}", lw=0.8)
        ax.plot(e_sig, sigma_space(e_path, e_sig)[:, j, 0], "--", color=f"C{j}", lw=1.2)
        ax.plot(e_sig, sigma_space(ddim_path, e_sig)[:, j, 0], "o", color=f"C{j}", ms=4, mfc="none")
    ax.invert_xaxis()
    ax.set(xlabel=r"$\sigma$", ylabel=r"$x_1$ of $x = x_t/\sqrt{\bar\alpha}$")
    if lim:
        ax.set_xlim(lim, 0)
        ax.set_ylim(-4, 4)
axes[0].set_title("solid: exact ODE path; dashed: Euler, 10 steps; o: DDIM (eta = 0)")
axes[1].set_title("the last part, sigma < 1.5: where the steps are too coarse")
savefig(fig, "11_ddim_is_euler.png")

# %% [markdown]
# ## 2. Better use of the slopes
#
# **Heun** (Karras et al. Algorithm 1; `k_samplers.heun_step`) pays a second call: Euler's guess
# $x' = x_i + h\,d_i$, the slope there $d' = \hat\varepsilon(x', \sigma_{i+1})$, then the trapezoid
# $x_{i+1} = x_i + h\,(d_i + d')/2$, $h = \sigma_{i+1} - \sigma_i$.  Second order: the error per
# unit of $\sigma$ falls as $h^2$, at 2 calls a step (the last step, into $\sigma = 0$ where $d$ is
# undefined, is plain Euler).
#
# **Multistep** solvers get a second slope for free: the previous step's.  **LMS**
# (`k_samplers.lms_step`) integrates the polynomial through the last 4 slopes in $\sigma$.
# **DPM-Solver++ 2M** (Lu et al. 2022; `dpm_solver.dpmpp_2m_step`) steps in the half log-SNR
# $\lambda = \log(\alpha_t/\sigma_t) = -\log\sigma$, $h_i = \lambda_{i+1} - \lambda_i$, where the
# ODE written for $\hat x_0$ integrates exactly if $\hat x_0$ is constant over the step:
#
# $$x_{t_{i+1}} = \frac{\sigma_{t_{i+1}}}{\sigma_{t_i}}\,x_{t_i} - \alpha_{t_{i+1}}\,(e^{-h_i} - 1)\,D_i,
#   \qquad D_i = \hat x_0^{(i)} + \frac{1}{2r_i}\big(\hat x_0^{(i)} - \hat x_0^{(i-1)}\big),
#   \quad r_i = \frac{h_{i-1}}{h_i}$$
#
# ($x_t$ in the VP space, $\alpha_t = \sqrt{\bar\alpha_t}$, $\sigma_t = \sqrt{1-\bar\alpha_t}$).
# With $D_i = \hat x_0^{(i)}$ this *is* DDIM; the correction extrapolates $\hat x_0$ linearly in
# $\lambda$ from the previous one.  **UniPC** (`dpm_solver.unipc_step`) adds a corrector that reuses
# the new call to refine the step just taken; **PLMS** (`plms.py`) is Adams–Bashforth on $\hat\varepsilon$
# in DDIM's step.

# %% [markdown]
# ## 3. Euler a: what ancestral noise does
#
# Euler ancestral (`k_samplers.euler_ancestral_tables`) splits the jump $\sigma_i \to \sigma_{i+1}$:
# an Euler step *past* the target, down to $\sigma_{down}$, then fresh noise of scale $\sigma_{up}$:
#
# $$\sigma_{up} = \min\!\Big(\sigma_{i+1},\ \eta\sqrt{\sigma_{i+1}^2(\sigma_i^2 - \sigma_{i+1}^2)/\sigma_i^2}\Big),
#   \qquad \sigma_{down} = \sqrt{\sigma_{i+1}^2 - \sigma_{up}^2}.$$
#
# Noise levels add in quadrature, so the sample lands at $\sigma_{i+1}$ again; but the new noise
# replaces part of the old, so the path forgets $x_T$: Euler a solves an SDE, it samples the same
# distribution, not the ODE's point.  It also never converges to one image as N grows.

# %%
n_a = 10
a_tables = tables_for("euler_a", n_a, "karras")
ode_end = solvers.run(SOLVERS["euler"], predict, x_T, tables_for("euler", n_a, "karras"))
noise = rng.standard_normal((n_a,) + x_T.shape)
anc_end = solvers.run(SOLVERS["euler_a"], predict, x_T, a_tables, noise)
data, _ = gm.sample(len(x_T), rng)

fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
i = np.arange(n_a)
axes[0].semilogy(i, a_tables["sigma"], "ko-", label=r"$\sigma_i$")
axes[0].semilogy(i[:-1], a_tables["sigma_down"][:-1], "v-", label=r"$\sigma_{down}$ (Euler goes here)")
axes[0].semilogy(i[:-1], a_tables["sigma_up"][:-1], "^-", label=r"$\sigma_{up}$ (fresh noise)")
axes[0].semilogy(i[:-1], a_tables["sigma_next"][:-1], "s--", mfc="none", label=r"$\sigma_{i+1}$")
axes[0].set(xlabel="step i", title=f"Euler a, {n_a} Karras steps on SD's schedule (the last step adds none)")
axes[0].legend(fontsize=8)
axes[1].scatter(data[:, 0], data[:, 1], s=1, color="gray", alpha=0.3, label="data")
axes[1].scatter(ode_end[:, 0], ode_end[:, 1], s=2, label="Euler (ODE)")
axes[1].scatter(anc_end[:, 0], anc_end[:, 1], s=2, label="Euler a (SDE)")
for j in range(25):  # the same x_T, two different ends
    axes[1].plot([ode_end[j, 0], anc_end[j, 0]], [ode_end[j, 1], anc_end[j, 1]], "k-", lw=0.5)
axes[1].set(title="the same x_T: both on the data, at different points", xlim=(-4, 4), ylim=(-4, 3.5))
axes[1].set_aspect("equal")
axes[1].legend(fontsize=8, markerscale=4)
savefig(fig, "11_euler_ancestral.png")
print(f"RMS distance Euler vs Euler a from the same x_T: {np.sqrt(np.mean(np.sum((ode_end - anc_end) ** 2, 1))):.2f}")

# %% [markdown]
# ## 4. Why Karras spacing
#
# The default grid takes the sigmas of evenly spaced timesteps.  On SD's schedule, $\sigma(t)$
# falls fast near $t = 0$, so the last timestep gap crosses a whole decade of noise at once: with 10
# steps, $\sigma = 0.35 \to 0.04$, a log-SNR step $h = \log(\sigma_i/\sigma_{i+1}) = 2.1$, just
# where the path bends (section 1) and the picture's details are decided.  Karras et al. (eq. 5)
# space the steps evenly in $\sigma^{1/\rho}$ between the same ends:
#
# $$\sigma_i = \Big(\sigma_{max}^{1/\rho} + \tfrac{i}{N-1}\big(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}\big)\Big)^{\rho},
#   \qquad \rho = 7$$
#
# (`sigmas.karras_sigmas`): dense in $\sigma$ near $\sigma_{min}$, nearly even in $\log\sigma = -\lambda$,
# no step much larger than the others (right panel).

# %%
grids = {"default (SD: leading, offset 1)": sigma_grid(sched, 10, "default", "leading", 1).sigmas[:-1],
         "karras, rho = 7": sigma_grid(sched, 10, "karras", "leading", 1).sigmas[:-1]}
lo, hi = grids["default (SD: leading, offset 1)"][[-1, 0]]
assert np.allclose(grids["karras, rho = 7"], karras_sigmas(lo, hi, 10))
fig, axes = plt.subplots(1, 2, figsize=(13, 4.3))
for k, (label, s) in enumerate(grids.items()):
    axes[0].semilogy(np.arange(10), s, "o-", label=label)
    axes[0].scatter(np.full(10, 10.4 + 0.4 * k), s, marker="_", s=300, color=f"C{k}")
    axes[1].bar(np.arange(9) + 0.2 * (2 * k - 1), np.log(s[:-1] / s[1:]), width=0.4, label=label)
axes[0].set(xlabel="step i", ylabel=r"$\sigma_i$ (log scale)", title="10 sigmas on SD's schedule (then 0)")
axes[0].legend()
axes[1].set(xlabel="step i", ylabel=r"$h_i = \log(\sigma_i/\sigma_{i+1})$", title="the step in log-SNR")
axes[1].legend()
savefig(fig, "11_sigma_grids.png")
for label, s in grids.items():
    print(f"{label:32s}", np.array2string(s, precision=3, max_line_width=200))

# %% [markdown]
# ## 5. Error against the number of network calls
#
# From one batch of $x_T$, every sampler on SD's schedule ("linspace" spacing: every grid starts
# at $t = 999$ and ends at $\sigma_{min} = \sigma(t = 0)$ with a step onto $\hat x_0$; DPM-Solver
# and UniPC on Karras sigmas, as they are used).  The reference is the 1000-step DPM-Solver++ 2M
# solution of the same ODE from the same $x_T$; the error is the RMS distance to it.  NFE counts
# network calls: Heun makes 2 a step.  On a log-log plot a method of order $p$ is a line of slope
# $-p$ (until the first, always first-order steps dominate).

# %%
x_ref = solvers.run(SOLVERS["dpmpp_2m"], predict, x_T, ref_tables)
check = solvers.run(SOLVERS["dpmpp_2m"], predict, x_T, tables_for("dpmpp_2m", 500, "exponential", "trailing"))
rms = lambda a, b: float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))  # noqa: E731
print(f"reference: 1000 steps vs 500 steps differ by {rms(x_ref, check):.1e} (RMS)")

steps_list = [4, 6, 10, 20] if QUICK else [3, 4, 5, 6, 8, 10, 15, 20, 30, 50, 100]
methods = {  # label: (solver, sigmas)
    "ddim": ("ddim", "default"), "euler": ("euler", "default"), "euler (karras)": ("euler", "karras"),
    "heun": ("heun", "default"), "lms": ("lms", "default"), "plms": ("plms", "default"),
    "dpmpp_2m (karras)": ("dpmpp_2m", "karras"), "unipc (karras)": ("unipc", "karras"),
    "euler_a (karras)": ("euler_a", "karras"),
}
if QUICK:
    methods = {k: methods[k] for k in ("ddim", "heun", "dpmpp_2m (karras)", "unipc (karras)", "euler_a (karras)")}
curves = {}
for label, (name, sig) in methods.items():
    curves[label] = []
    for n in steps_list:
        if name == "ddim":
            x0, nfe = sample(predict, x_T, InferenceSchedule.create(sched, n, "linspace", 0, True), "ddim"), n
        else:
            tb = tables_for(name, n, sig)
            z = rng.standard_normal((len(tb["t"]),) + x_T.shape) if SOLVERS[name].stochastic else None
            x0 = solvers.run(SOLVERS[name], predict, x_T, tb, z)
            nfe = len(tb["t"]) * SOLVERS[name].evaluations_per_row
        curves[label].append((nfe, rms(x0, x_ref)))

fig, ax = plt.subplots(figsize=(8, 5.5))
for k, (label, c) in enumerate(curves.items()):
    nfe, err = np.array(c).T
    style = dict(ls="--", color="gray") if label.startswith("euler_a") else dict(ls="-", color=f"C{k}")
    ax.loglog(nfe, err, marker="o", ms=4, label=label, **style)
ticks = [t for t in (2, 3, 5, 10, 20, 50, 100, 200) if t <= max(n for c in curves.values() for n, _ in c)]
ax.set_xticks(ticks, [str(t) for t in ticks])
ax.xaxis.set_minor_formatter(plt.NullFormatter())
ax.axhline(rms(x_ref, check), color="k", lw=0.5, ls=":", label="reference's own error (1000 vs 500 steps)")
ax.set(xlabel="network calls (NFE)", ylabel="RMS distance to the exact ODE solution",
       title="Samplers on the exact predictor of a 2-D mixture (SD's schedule)")
ax.legend(fontsize=8)
ax.grid(True, which="both", alpha=0.3)
savefig(fig, "11_error_vs_nfe.png")
print("NFE:RMS error, and the slope of log error against log NFE over the last 3 points:")
for label, c in curves.items():
    nfe, err = np.log(np.array(c)[-3:]).T
    print(f"  {label:18s}", "  ".join(f"{n:3d}:{e:.1e}" for n, e in c), f"  slope {np.polyfit(nfe, err, 1)[0]:+.1f}")

# %% [markdown]
# Read the figure (full mode; the slopes are printed above): DDIM and Euler give the same numbers,
# a line of slope $-1$.  Heun and DPM-Solver++ 2M have slope $-2$, UniPC's corrector steeper still;
# LMS (order 4 on paper) flattens at the end, where its polynomial's last step lands off $\hat x_0$.
# PLMS (SD 1.5's default) is good at few steps but measures close to first order beyond ~20 here.
# Heun's two calls pay off only from ~15 NFE: with 3 steps it is the worst.  Per call the
# multistep solvers win, which is why "DPM++ 2M Karras" and UniPC are the defaults at 20-30 steps.
# Karras spacing does *not* help Euler here: this mixture's components have a standard deviation of
# about 0.5, so its paths bend at $\sigma \approx 0.3$-$2$ (section 1), while Karras puts its steps
# below that; images have details down to $\sigma_{min}$, the regime its $\rho = 7$ was tuned on.
# Euler a's distance to the ODE's point does not shrink: it is right about the distribution, not
# about this $x_T$'s image.

# %% [markdown]
# ## 6. The built-in mini SD at 6 steps
#
# The same step functions, compiled into one `lax.scan` by the pipeline (`sampling.solver_chain`),
# with the UNet in place of the oracle: the same prompts and the same $x_T$ (seed) for every
# sampler, only 6 steps.  The built-in model uses the cosine schedule with "trailing" spacing: its
# first sigma is $\sigma(t = 999) = 20{,}291$ ($\bar\alpha = 2.4\cdot 10^{-9}$).  Heun's first
# step is Euler's plus $\tfrac h2(d' - d_0)$ with $h \approx -20{,}000$: any disagreement between
# the network's $\hat\varepsilon$ at the two noise levels is multiplied by ten thousand, far more
# than $\sigma_1$, and its pictures are noise (shown in full mode).  A one-call sampler lands on
# $\hat x_0 + \sigma_1\hat\varepsilon$ whatever $\sigma_0$ is, and is unaffected.

# %%
from minidiff.pipeline import load_pipeline  # noqa: E402

pipe = load_pipeline()
print(pipe.scheduler)
prompts = ["a large red triangle in the top right", "a small blue circle at the bottom",
           "a large yellow square on the left", "a small green triangle in the center"]
samplers = ["ddim", "euler", "euler_a", "heun", "lms", "plms", "dpmpp_2m", "unipc"]
if QUICK:
    prompts, samplers = prompts[:2], ["ddim", "euler_a", "dpmpp_2m"]  # each sampler compiles its own scan
pictures = {}
for name in samplers:
    t0 = time.perf_counter()
    sig = "karras" if name == "dpmpp_2m" else None
    pictures[name] = pipe(prompts, sampler=name, steps=6, seed=7, sigmas=sig)
    print(f"{name:9s} {time.perf_counter() - t0:5.1f} s")
if not QUICK:  # how far each 6-step picture is from the converged one (same x_T, 50 steps)
    converged = pipe(prompts, sampler="dpmpp_2m", sigmas="karras", steps=50, seed=7).astype(np.float64)
    for name, im in pictures.items():
        print(f"{name:9s} mean |6 steps - converged (DPM++ 2M Karras, 50 steps)| = "
              f"{np.abs(im - converged).mean():5.1f} / 255")

for sig in ("default", "karras"):  # the grids DPM-Solver++ 2M walks on this model at 6 steps
    rows = pipe._rows("dpmpp_2m", sig, 6)
    print(f"dpmpp_2m {sig:8s} sigmas:", np.array2string(sigma_from_alpha_bar(rows["ab"]), precision=3))

fig, axes = plt.subplots(len(prompts), len(samplers), figsize=(1.7 * len(samplers), 1.8 * len(prompts) + 0.4),
                         squeeze=False)
for c, name in enumerate(samplers):
    for r, prompt in enumerate(prompts):
        axes[r, c].imshow(pictures[name][r])
        axes[r, c].set_xticks([])
        axes[r, c].set_yticks([])
        if c == 0:
            axes[r, c].set_ylabel(prompt.replace(" in the", "\nin the").replace(" at the", "\nat the")
                                  .replace(" on the", "\non the"), fontsize=7)
    axes[0, c].set_title(name + (" karras" if name == "dpmpp_2m" else ""), fontsize=9)
fig.suptitle("the built-in mini SD, 6 steps, same seed", fontsize=10)
savefig(fig, "11_six_steps.png")

# %% [markdown]
# On this model 6 steps of DPM++ 2M *Karras* go wrong (full mode measures ~13/255 from the converged
# picture, against 0.6-3/255 for the other one-call samplers; 50 steps of it are the reference).  The
# printed grid says why: Karras spans all the training sigmas, and on the cosine schedule that is
# $0.0064$ to $20{,}291$, six and a half decades; even in $\sigma^{1/7}$, 6 points put four calls at
# $\sigma \ge 100$, where nothing happens, then jump from $3.9$ to $0.0064$ in one step.  $\rho = 7$ was
# tuned for $\sigma_{max} = 80$; the grid matters as much as the method.

# %% [markdown]
# **Takeaways.** A sampler is an ODE solver for $dx/d\sigma = \hat\varepsilon$ (plus, for the
# ancestral ones, injected noise).  DDIM is Euler; Heun buys second order with a second call;
# multistep solvers (LMS, PLMS, DPM-Solver++ 2M, UniPC) get it for free from the previous call; the
# grid matters as much as the method, and Karras spacing puts the steps where the path bends.

# %%
print(f"lesson time {time.perf_counter() - t_start:.1f} s")

# %% [markdown]
# ## Exercises
# Solutions, each checked by the test suite: `lessons/solutions/11_samplers_as_ode_solvers.py`.
#
# 1. **Measure the order.** A method of order p has error $\propto h^p$, so doubling the steps divides it
#    by $2^p$.  Estimate p for Euler and Heun from their errors at 10, 20 and 40 steps (the exact
#    mixture predictor, the 1000-step reference of §5).  Which one reaches its textbook order here?
# 2. **What Euler a gets right.** Its distance to the ODE's solution from the same $x_T$ does not
#    shrink with more steps (§5).  Measure instead its distance to the *data* (sliced Wasserstein
#    against fresh mixture samples, next to the distance between two data samples) at 20, 50 and 100
#    steps, and the same for Euler.  What does "converges" mean for each?

