# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 2 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.data import TOY_MIXTURE as gm  # noqa: E402
from minidiff.diffusion import InferenceSchedule, NoiseSchedule, sample  # noqa: E402
from minidiff.metrics import sliced_wasserstein  # noqa: E402

rng = np.random.default_rng(0)
n = 1000 if QUICK else 5000
directions = rng.standard_normal((64, 2))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)



# %% [markdown]
# ## 1. Posterior vs forward variance
# $\tilde\beta_t / \beta_t = (1-\bar\alpha_{t-1}) / (1-\bar\alpha_t)$, and $\bar\alpha_t = \alpha_t\bar\alpha_{t-1} < \bar\alpha_{t-1}$,
# so the ratio is below 1; it tends to 1 as $\bar\alpha_{t-1} \to 0$ (then both numerator and
# denominator tend to 1).  It is small only at the first steps, where $1 - \bar\alpha_{t-1}$ is
# itself of the order of one $\beta$: at $t = 1$ the ratio is exactly $\beta_0 / (\beta_0 + \beta_1 - \beta_0\beta_1) \approx 1/2$.

# %%
sd = NoiseSchedule.from_name("scaled_linear")
t = np.arange(1, sd.num_train_timesteps)
ratio = sd.posterior_variance[t] / sd.betas[t]
assert np.all(ratio <= 1) and ratio[-1] > 0.999
below_half = t[ratio < 0.5]
print(f"beta_tilde / beta: {ratio[0]:.3f} at t=1, {ratio[9]:.3f} at t=10, {ratio[-1]:.5f} at t=999; "
      f"below 1/2 at t = {below_half.tolist() or 'none'}")
assert below_half.size <= 1  # only at the very first step, if at all

# %% [markdown]
# ## 2. Between DDIM and DDPM
# At 10 steps the fully stochastic chain ($\eta = 1$, DDPM) is clearly the farthest: each coarse
# noisy step adds noise that the few remaining steps cannot remove.  $\eta = 0$ and $\eta = 0.5$
# are within a few error bars of each other (a little noise can even help: it corrects some of the
# discretisation error).  At 100 steps all three are several times closer than any 10-step run, and
# their differences are of the size of the error bars: the ranking does not hold.


# %%
def oracle(x, t):
    return gm.eps_oracle(x, sd_toy.alpha_bar[t])


sd_toy = NoiseSchedule.from_name("linear")
reference, _ = gm.sample(n, rng)
repeats = 8
result = {}
for steps in (10, 100):
    isc = InferenceSchedule.create(sd_toy, steps)
    for eta in (0.0, 0.5, 1.0):
        d = [sliced_wasserstein(sample(oracle, rng.standard_normal((n, 2)), isc, "ddim", eta=eta, rng=rng), reference,
                                directions) for _ in range(repeats)]
        result[steps, eta] = (np.mean(d), np.std(d, ddof=1) / np.sqrt(repeats))
        print(f"{steps:4d} steps, eta={eta}: sliced W = {result[steps, eta][0]:.4f} ± {result[steps, eta][1]:.4f}")
worst_10 = result[10, 1.0]
for eta in (0.0, 0.5):
    assert result[10, eta][0] + 2 * result[10, eta][1] < worst_10[0] - 2 * worst_10[1]
assert max(m for (s, _), (m, _) in result.items() if s == 100) < min(m for (s, _), (m, _) in result.items() if s == 10)

# %% [markdown]
# ## 3. The forward variance in the reverse step
# At 1000 steps the two choices differ only where $\tilde\beta_t \ne \beta_t$, i.e. at the first few
# timesteps (Exercise 1), and the samples have the data's spread either way — DDPM's paper found
# both work.  With 25 steps each step's effective $\beta = 1 - \bar\alpha_t/\bar\alpha_{t_{prev}}$ is large and
# $\tilde\beta$ is much smaller than it at the last steps.  The result may surprise: with $\tilde\beta$ the
# samples come out *narrower* than the data, with $\beta$ about right.  $\tilde\beta_t$ is the exact
# reverse variance only if $x_0$ were known; the model knows only $\hat x_0 = \mathbb E[x_0 \mid x_t]$, an
# average that is less spread than $x_0$, and a long chain of small steps makes up for that while a
# short one does not.  Ho et al. (2020, §3.2) give the two choices as the two extremes: $\tilde\beta_t$
# is optimal for a single fixed $x_0$, $\beta_t$ for $x_0 \sim \mathcal N(0, I)$; a learned variance
# (Improved DDPM) interpolates between them.

# %%
m = 10_000
data_cov = np.cov(gm.sample(50_000, rng)[0].T)
spread = {}
for steps in (1000, 25):
    isc = InferenceSchedule.create(sd_toy, steps)
    for variance in ("beta_tilde", "beta"):
        x = sample(oracle, rng.standard_normal((m, 2)), isc, "ddpm", rng=rng, variance=variance)
        spread[steps, variance] = np.trace(np.cov(x.T)) / np.trace(data_cov)
        print(f"{steps:5d} steps, variance={variance:10s}: trace(cov) / data's = {spread[steps, variance]:.3f}")
assert abs(spread[1000, "beta"] - 1) < 0.05 and abs(spread[1000, "beta_tilde"] - 1) < 0.05
assert spread[25, "beta_tilde"] < 0.95 and spread[25, "beta"] - spread[25, "beta_tilde"] > 0.04
