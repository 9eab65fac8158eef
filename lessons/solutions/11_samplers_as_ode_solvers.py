# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 11 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.data import TOY_MIXTURE as gm  # noqa: E402
from minidiff.diffusion import NoiseSchedule, solvers  # noqa: E402
from minidiff.diffusion.sigmas import sigma_from_alpha_bar, timestep_from_sigma  # noqa: E402
from minidiff.diffusion.solvers import SOLVERS  # noqa: E402
from minidiff.metrics import sliced_wasserstein  # noqa: E402

rng = np.random.default_rng(0)
sched = NoiseSchedule.from_name("scaled_linear")
train_sigmas = sigma_from_alpha_bar(np.asarray(sched.alpha_bar, np.float64))


def predict(x, t):  # the exact eps_hat at a fractional timestep (as in the lesson)
    sigma = np.exp(np.interp(t, np.arange(len(train_sigmas)), np.log(train_sigmas)))
    return gm.eps_oracle(x, 1 / (1 + sigma**2))


def tables_for(name, n, sigmas="default", spacing="linspace"):  # as in the lesson: exact t for each sigma
    tables = dict(SOLVERS[name].tables(sched, n, sigmas, spacing, 0))
    for key, sig in (("t", "sigma"), ("t_2", "sigma_2")):
        if sig in tables:
            tables[key] = timestep_from_sigma(tables[sig], train_sigmas)
    if "ab" in tables:
        tables["t"] = timestep_from_sigma(sigma_from_alpha_bar(tables["ab"]), train_sigmas)
    return tables


def rms(a, b):
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))


x_T = rng.standard_normal((500 if QUICK else 2000, 2))
reference = solvers.run(SOLVERS["dpmpp_2m"], predict, x_T, tables_for("dpmpp_2m", 1000, "exponential", "trailing"))

# %% [markdown]
# ## 1. The order, measured
# $p \approx \log_2(e_n / e_{2n})$.  Heun shows its order 2 already from 10 steps.  Euler's estimate is
# still below 1 at 20 -> 40 steps: the first-order error term is not yet alone (its large first
# steps, at $\sigma$ of 14.6 down to a few, dominate); it creeps towards 1 with more steps.

# %%
errors = {name: [rms(solvers.run(SOLVERS[name], predict, x_T, tables_for(name, n)), reference) for n in (10, 20, 40)]
          for name in ("euler", "heun")}
order = {name: np.log2(np.array(e[:-1]) / np.array(e[1:])) for name, e in errors.items()}
for name in errors:
    print(f"{name:5s}: errors at 10/20/40 steps {np.round(errors[name], 4)}; order estimates {np.round(order[name], 2)}")
assert 1.7 < order["heun"][-1] < 2.3
assert 0.5 < order["euler"][-1] < 1.2 and order["euler"][-1] < order["heun"][-1] - 0.7

# %% [markdown]
# ## 2. Converging to what
# Euler converges to the ODE's solution from *this* $x_T$ (its distance to the reference shrinks
# like $1/n$) and therefore to the data distribution.  Euler a never approaches that point (it adds
# fresh noise at every step: its path is another one), but its samples' distance to the data falls
# to the level of two data samples, like Euler's: it converges *in distribution*.

# %%
directions = rng.standard_normal((64, 2))
directions /= np.linalg.norm(directions, axis=1, keepdims=True)



n_pts = 4000
x_T2 = rng.standard_normal((n_pts, 2))
reference2 = solvers.run(SOLVERS["dpmpp_2m"], predict, x_T2, tables_for("dpmpp_2m", 1000, "exponential", "trailing"))
data, data2 = gm.sample(n_pts, rng)[0], gm.sample(n_pts, rng)[0]
floor = sliced_wasserstein(data2, data, directions)
result = {}
for n in (20, 50, 100):
    tb = tables_for("euler_a", n, "karras")
    x_a = solvers.run(SOLVERS["euler_a"], predict, x_T2, tb, rng.standard_normal((len(tb["t"]),) + x_T2.shape))
    x_e = solvers.run(SOLVERS["euler"], predict, x_T2, tables_for("euler", n))
    result[n] = dict(a_point=rms(x_a, reference2), a_data=sliced_wasserstein(x_a, data, directions),
                     e_point=rms(x_e, reference2), e_data=sliced_wasserstein(x_e, data, directions))
    print(f"{n:3d} steps: Euler a: to the ODE point {result[n]['a_point']:.3f}, to the data {result[n]['a_data']:.3f} | "
          f"Euler: {result[n]['e_point']:.3f}, {result[n]['e_data']:.3f} | two data samples {floor:.3f}")
assert min(r["a_point"] for r in result.values()) > 1.0  # never near the ODE's point
assert result[100]["e_point"] < 0.5 * result[20]["e_point"]  # Euler converges to it
assert result[100]["a_data"] < 2 * floor and result[100]["e_data"] < 2 * floor  # both reach the data
