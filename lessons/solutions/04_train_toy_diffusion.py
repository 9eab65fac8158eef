# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Lesson 4 — solutions to the exercises
# Each answer is computed, then checked with an `assert`: the test suite runs this file in quick mode.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent) if "__file__" in globals() else "..")
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _lesson import QUICK  # noqa: E402

from minidiff.data import TOY_MIXTURE as gm  # noqa: E402
from minidiff.diffusion import InferenceSchedule, q_sample, sample, split_prediction  # noqa: E402
from minidiff.train.diffusion import Batches, Denoiser, Trainer, TrainConfig  # noqa: E402

rng = np.random.default_rng(0)
SHORT = dict(steps=600 if QUICK else 3000, batch=256, lr=3e-3, lr_decay=True, model_kwargs={"hidden": 64, "num_blocks": 2})


def train(data="gmm", **kw):
    cfg = TrainConfig.create(data, **{**SHORT, **kw})
    trainer = Trainer(cfg)
    trainer.train(progress=False)
    return Denoiser(cfg, trainer.state["ema_params"])


def oracle_eps(x_t, t, alpha_bar):
    """E[eps | x_t] of the mixture, one timestep at a time (the oracle takes one alpha_bar)."""
    out = np.empty_like(x_t)
    for s in np.unique(t):
        k = t == s
        out[k] = gm.eps_oracle(x_t[k], alpha_bar[s])
    return out


# %% [markdown]
# ## 1. The loss floor
# The loss is a regression of $\varepsilon$ on $x_t$; its minimum over *all* functions is reached by
# the conditional mean $\mathbb E[\varepsilon \mid x_t]$, and what is left is the average conditional
# variance of $\varepsilon$ — here computable, because the mixture's oracle is exact.  The trained MLP
# lands a little above the floor, never below it (up to the Monte Carlo error of the estimate).

# %%
den = train("gmm")
sched = den.config.noise_schedule()
x0, _ = gm.sample(20_000, rng)
t = rng.integers(0, 1000, len(x0))
eps = rng.standard_normal(x0.shape)
x_t = q_sample(x0, sched.alpha_bar[t], eps)
floor_terms = np.mean((eps - oracle_eps(x_t, t, sched.alpha_bar)) ** 2, 1)
net_terms = np.mean((eps - np.asarray(den(den.params, x_t.astype(np.float32), t))) ** 2, 1)
floor, net = floor_terms.mean(), net_terms.mean()
se = np.std(net_terms - floor_terms, ddof=1) / np.sqrt(len(x0))
print(f"oracle (floor) {floor:.4f}   trained MLP {net:.4f}   excess {net - floor:.4f} ± {se:.4f}")
assert net - floor > -3 * se  # nothing beats the conditional mean
assert net < 1.25 * floor  # and the MLP gets close to it
assert floor < 0.6  # far below the untrained network's ~1: most of eps is predictable from x_t

# %% [markdown]
# ## 2. A third target
# In $\varepsilon$ units, a model that predicts $\hat x_0$ gives $\hat\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1-\bar\alpha_t}$:
# its error in $\hat x_0$ is multiplied by $\sqrt{\bar\alpha_t/(1-\bar\alpha_t)}$, which is about 100 at t = 0 — the
# mirror image of the $\varepsilon$ target at high t.  So the $x_0$ target goes wrong at *low* t, exactly
# where DDIM takes its last steps.  $v$ is the target whose error is never amplified in either unit.

# %%
models = {p: train("moons", prediction=p) for p in ("epsilon", "v_prediction", "sample")}
x0m = Batches(models["epsilon"].config)(10**9 + 3, 4000)[0]
buckets = [(0, 20), (20, 100), (100, 500), (500, 1000)]
err = {p: [] for p in models}
for lo, hi in buckets:
    tb = rng.integers(lo, hi, len(x0m))
    eb = rng.standard_normal(x0m.shape).astype(np.float32)
    ab = sched.alpha_bar[tb]
    xb = q_sample(x0m, ab, eb).astype(np.float32)
    for p, d in models.items():
        _, eps_hat = split_prediction(np.asarray(d(d.params, xb, tb)), xb, ab, p)
        err[p].append(float(np.mean((eps_hat - eb) ** 2)))
print("E||eps_hat - eps||^2 per dim, t in " + "  ".join(f"[{lo},{hi})" for lo, hi in buckets))
for p in models:
    print(f"  {p:13s} " + "  ".join(f"{e:9.3f}" for e in err[p]))
assert err["sample"][0] > 3 * max(err["epsilon"][0], err["v_prediction"][0])  # x0 target: bad at low t
assert err["sample"][-1] < 2 * err["epsilon"][-1]  # and fine at high t

# %% [markdown]
# ## 3. Guidance without the "no class" label
# `Denoiser.sample` refuses guidance for a model trained with `cond_drop=0`: its "no class" label
# was never seen in training, so $\hat\varepsilon(x, \varnothing)$ is whatever the random initial embedding of that
# label makes the network output — not the unconditional predictor that classifier-free guidance
# extrapolates away from.  Forced by hand, guidance pushes the samples along a meaningless
# direction, far past the requested component: the nearest component is still the right one, but
# almost no sample lies *on* it (inside its 99 % ellipse, Mahalanobis $d^2 < 9.21$).  The properly
# trained model keeps nearly all its guided samples there.


# %%
def guided(d, net, label, w, steps=50, n=1000):
    """DDIM samples of class ``label`` at guidance w; ``net`` = the jitted ``d.__call__`` (compiled once per model)."""
    null = d.config.num_classes  # the "no class" label

    def eps_fn(x, t):
        x = x.astype(np.float32)
        tt = np.full(len(x), t)
        e_c = np.asarray(net(d.params, x, tt, np.full(len(x), label)))
        e_u = np.asarray(net(d.params, x, tt, np.full(len(x), null)))
        return e_u + w * (e_c - e_u)

    isc = InferenceSchedule.create(d.config.noise_schedule(), steps)
    return sample(eps_fn, rng.standard_normal((n, 2)), isc, "ddim")


def on_component(x, c):
    """The fraction of points inside component c's 99 % ellipse."""
    diff = x - gm.means[c]
    d2 = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(gm.covariances[c]), diff)
    return float(np.mean(d2 < 9.21))


on = {}
for drop in (0.1, 0.0):
    d = train("gmm", cond="class", cond_drop=drop, steps=2000)
    net = jax.jit(d.__call__)
    for w in (1.0, 3.0):  # w = 1 is the plain conditional model
        on[drop, w] = float(np.mean([on_component(guided(d, net, c, w), c) for c in range(len(gm.weights))]))
        print(f"cond_drop={drop}: w={w}: {100 * on[drop, w]:.0f} % of samples on the requested component")
assert on[0.1, 1.0] > 0.9 and on[0.0, 1.0] > 0.9  # without guidance both models are fine
assert on[0.1, 3.0] > 0.9  # guidance with a trained "no class" stays on the data
assert on[0.0, 3.0] < 0.3  # guidance with an untrained "no class" leaves it
