"""Sampler error against the number of network evaluations (NFE), with the exact noise predictor.

    nice -n 10 taskset -c 1 python benchmarks/sampler_nfe.py [--n 5000]

Stable Diffusion's schedule (scaled_linear 0.00085..0.012, 1000 steps, "leading" spacing,
steps_offset 1, DDIM/PLMS ending at alpha_bar[0]: what the pipeline uses) and the 2-D toy mixture
(minidiff.data.TOY_MIXTURE), whose exact E[eps | x_t] stands in for a perfectly trained network: a
"network" called at timestep t returns the oracle at the alpha_bar of t (log-sigma interpolation
between training steps for fractional t, as diffusers' samplers assume).

Every deterministic sampler starts from the same x_T ~ N(0, I) (n points) and solves the
probability-flow ODE.  Its error is the RMS distance per point to the exact solution of the same
initial value problem: the ODE from the sampler's own first noise level (where it takes x_T) to its
own last one (sigma = 0, or alpha_bar[0] for DDIM/PLMS), computed by RK4 in log sigma with the
continuous oracle (converged: halving the step changes it by < 1e-6; printed).  "Leading" spacing
starts few-step grids well below t = 999 (4 DDIM steps start at t = 751), so the error against the
one solution from t = 999 to sigma = 0 -- what a user would call the converged sample -- is printed
as a second table.

NFE = rows x evaluations_per_row (Heun: 2 per step, of which the last step's second one is unused;
PLMS: N + 1 for N steps); for each NFE budget a sampler runs the most steps that fit in it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidiff.data import TOY_MIXTURE  # noqa: E402
from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_step  # noqa: E402
from minidiff.diffusion.sigmas import sigma_from_alpha_bar  # noqa: E402
from minidiff.diffusion.solvers import SOLVERS, run  # noqa: E402

NFES = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100)
RUNS = [("ddim", "default"), *((s, g) for s in ("euler", "heun", "lms") for g in ("default", "karras")),
        ("plms", "default"), *((s, g) for s in ("dpmpp_2m", "unipc") for g in ("default", "karras"))]
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "sampler_accuracy.png"


class Oracle2D:
    """TOY_MIXTURE's exact E[eps | x_t] in closed form for 2-D (the same formula as
    GaussianMixture.eps_oracle, about 20x faster: 2 x 2 inverses written out)."""

    def __init__(self, gm):
        assert gm.dim == 2
        self.gm = gm

    def __call__(self, x, ab):
        gm, ab = self.gm, float(ab)
        logs, terms = [], []
        for w, mu, cov in zip(gm.weights, gm.means, gm.covariances):
            a, b, d = ab * cov[0, 0] + 1 - ab, ab * cov[0, 1], ab * cov[1, 1] + 1 - ab
            det = a * d - b * b
            dx, dy = x[:, 0] - ab**0.5 * mu[0], x[:, 1] - ab**0.5 * mu[1]
            px, py = (d * dx - b * dy) / det, (a * dy - b * dx) / det  # C^-1 (x - m)
            logs.append(np.log(w) - 0.5 * (dx * px + dy * py + np.log(det)))
            terms.append((px, py))
        lj = np.stack(logs, 1)
        r = np.exp(lj - lj.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        g = sum(r[:, k, None] * np.stack(terms[k], 1) for k in range(len(terms)))  # -grad log p_t
        return (1 - ab) ** 0.5 * g


def reference(eps, x_vp, sigma_start, sigma_end, h=0.02, sigma_floor=1e-4):
    """The exact probability-flow ODE dx/dsigma = eps(x) (x = x_t / sqrt(ab), the sigma space) by RK4
    in s = log sigma, from sigma_start to sigma_end (> 0), or to sigma_floor then one x0_hat jump when
    sigma_end = 0 (the jump's error is O(sigma_floor^2)).  Takes and returns VP-space x."""
    lo = max(sigma_end, sigma_floor)
    n = max(1, int(np.ceil((np.log(sigma_start) - np.log(lo)) / h)))
    s = np.linspace(np.log(sigma_start), np.log(lo), n + 1)

    def f(x, si):  # dx/ds = sigma * eps
        sig = np.exp(si)
        return sig * eps(x / (1 + sig * sig) ** 0.5, 1 / (1 + sig * sig))

    x = x_vp * (1 + sigma_start**2) ** 0.5
    for i in range(n):
        s0, dt = s[i], s[i + 1] - s[i]
        k1 = f(x, s0)
        k2 = f(x + dt / 2 * k1, s0 + dt / 2)
        k3 = f(x + dt / 2 * k2, s0 + dt / 2)
        k4 = f(x + dt * k3, s0 + dt)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    if sigma_end == 0:
        x = x - lo * eps(x / (1 + lo * lo) ** 0.5, 1 / (1 + lo * lo))  # x0_hat at sigma_floor
        return x
    return x / (1 + sigma_end**2) ** 0.5


def steps_for(name, nfe):
    """(steps, NFE used) for a budget: the most steps whose evaluations fit in it."""
    if name == "heun":
        return nfe // 2, 2 * (nfe // 2)
    if name == "plms":
        return nfe - 1, nfe
    return nfe, nfe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000, help="points (same x_T for every sampler)")
    ap.add_argument("--no-figure", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    sched = NoiseSchedule.from_name("scaled_linear")
    train_sigma = sigma_from_alpha_bar(sched.alpha_bar)
    eps = Oracle2D(TOY_MIXTURE)
    x_T = np.random.default_rng(0).standard_normal((args.n, 2))
    check = x_T[:200] * 3
    assert np.allclose(eps(check, 0.37), TOY_MIXTURE.eps_oracle(check, 0.37), atol=1e-12, rtol=1e-10)

    calls = [0]

    def network(x, t):  # the "network" at (fractional) timestep t: the oracle at alpha_bar(t)
        calls[0] += 1
        sigma = np.exp(np.interp(float(t), np.arange(len(train_sigma)), np.log(train_sigma)))
        return eps(x, 1 / (1 + sigma * sigma))

    def solve(name, sigmas, steps):
        """(x, sigma where x_T was taken, sigma at the end, NFE counted)."""
        calls[0] = 0
        if name == "ddim":
            isc = InferenceSchedule.create(sched, steps, "leading", 1, set_alpha_to_one=False)
            x = x_T
            for t, a, b in zip(isc.timesteps, isc.alpha_bar_t, isc.alpha_bar_prev):
                x = ddim_step(x, network(x, t), a, b, 0.0)[0]
            return x, sigma_from_alpha_bar(isc.alpha_bar_t[0]), sigma_from_alpha_bar(isc.alpha_bar_prev[-1]), calls[0]
        solver = SOLVERS[name]
        tab = solver.tables(sched, steps, sigmas, "leading", 1)
        x = run(solver, network, x_T, tab)
        if "sigma_next" in tab:  # the Euler family
            end = tab["sigma_next"][-1]
        elif "alpha_bar_prev" in tab:  # PLMS: alpha_bar[0], as DDIM
            end = sigma_from_alpha_bar(tab["alpha_bar_prev"][-1])
        else:  # DPM-Solver++ and UniPC: diffusers' final_sigmas_type "zero"
            end = 0.0
        return x, sigma_from_alpha_bar(tab["alpha_bar"][0]), float(end), calls[0]

    refs = {}

    def ref(s0, s1):
        key = (round(float(s0), 12), round(float(s1), 12))
        if key not in refs:
            refs[key] = reference(eps, x_T, *key)
        return refs[key]

    rms = lambda a, b: float(np.sqrt(np.mean(np.sum((a - b) ** 2, axis=1))))  # noqa: E731

    # The reference is converged: RK4 with step h vs h/2 on the longest range (t = 999 to sigma = 0).
    full = (float(train_sigma[-1]), 0.0)
    t0 = time.perf_counter()
    r_fine = reference(eps, x_T, *full, h=0.01)
    diff = rms(ref(*full), r_fine)
    print(f"reference: RK4 in log sigma, h = 0.02 vs 0.01 from sigma {full[0]:.2f} (t = 999) to 0: RMS change "
          f"{diff:.1e} ({time.perf_counter() - t0:.1f} s)")
    ddim_500 = solve("ddim", "default", 500)
    print(f"  cross-check: DDIM 500 steps vs the reference of its own range: RMS {rms(ddim_500[0], ref(*ddim_500[1:3])):.1e}")
    for name, sigmas in (("dpmpp_2m", "default"), ("euler", "karras")):
        x, s0, s1, _ = solve(name, sigmas, 500)
        print(f"  cross-check: {name} {sigmas} 500 steps vs the reference of its own range: RMS {rms(x, ref(s0, s1)):.1e}")
    assert diff < 1e-5

    err, err_e2e, used = {}, {}, {}
    for name, sigmas in RUNS:
        for nfe in NFES:
            steps, _ = steps_for(name, nfe)
            x, s0, s1, counted = solve(name, sigmas, steps)
            assert counted == steps_for(name, nfe)[1], (name, nfe, counted)
            err[name, sigmas, nfe] = rms(x, ref(s0, s1))
            err_e2e[name, sigmas, nfe] = rms(x, ref(*full))
            used[name, sigmas, nfe] = counted
    ddim50 = err["ddim", "default", 50]
    ddim50_e2e = err_e2e["ddim", "default", 50]

    def reach(e, target, name, sigmas):
        return next((n for n in NFES if e[name, sigmas, n] <= target), None)

    for title, e, target in (
            ("Error against the exact ODE solution of the same initial value problem (each sampler's own start "
             "and end)", err, ddim50),
            ("Error against the one ODE solution from t = 999 (sigma 14.6) to sigma = 0 (includes where "
             "\"leading\" spacing starts and DDIM/PLMS's stop at alpha_bar[0])", err_e2e, ddim50_e2e)):
        print(f"\n{title}\nRMS distance per point, n = {args.n:,}, data std ~1.4; DDIM-50: {target:.2e}")
        print(f"{'sampler':9s} {'sigmas':8s}" + "".join(f"{n:>9d}" for n in NFES) + "   NFE to DDIM-50")
        for name, sigmas in RUNS:
            r = reach(e, target, name, sigmas)
            print(f"{name:9s} {sigmas:8s}" + "".join(f"{e[name, sigmas, n]:9.1e}" for n in NFES)
                  + f"   {r if r else '> 100':>8}")
    print("(Heun: NFE = 2 x steps; PLMS: steps + 1; the others: steps)")

    # The multistep solvers' last step: one x0_hat jump from their last sigma to 0 (first order).
    print("\nThe last step of DPM++ 2M / UniPC alone: x0_hat from the exact x at the last sigma, vs the exact x0")
    for label, steps, sigmas in (("default sigmas, 50 steps", 50, "default"), ("Karras sigmas (any N)", 50, "karras")):
        tab = SOLVERS["dpmpp_2m"].tables(sched, steps, sigmas, "leading", 1)
        s0, sl = sigma_from_alpha_bar(tab["alpha_bar"][0]), sigma_from_alpha_bar(tab["ab"][-1])
        x_l = ref(s0, sl)
        x0_hat = (x_l - (1 - 1 / (1 + sl * sl)) ** 0.5 * eps(x_l, 1 / (1 + sl * sl))) * (1 + sl * sl) ** 0.5
        print(f"  {label}: last sigma {sl:.3f} (t = {tab['t'][-1]:.0f}): RMS {rms(x0_hat, ref(s0, 0.0)):.1e} "
              f"(the whole run: {err['dpmpp_2m', sigmas, steps]:.1e})")

    if not args.no_figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 5))
        colors = dict(zip(("ddim", "euler", "heun", "lms", "plms", "dpmpp_2m", "unipc"), plt.cm.tab10.colors))
        for name, sigmas in RUNS:
            ax.loglog(NFES, [err[name, sigmas, n] for n in NFES], "-" if sigmas == "default" else "--",
                      color=colors[name], marker=".", label=name + (" karras" if sigmas == "karras" else ""))
        ax.axhline(ddim50, color="gray", lw=0.8, ls=":")
        ax.text(NFES[0], ddim50 * 1.15, "DDIM, 50 steps", color="gray", fontsize=8)
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("RMS error vs exact ODE solution")
        ax.set_title("Samplers with the exact noise predictor (2-D mixture, SD schedule)", fontsize=10)
        ax.set_xticks(NFES, [str(n) for n in NFES], fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(FIGURE, dpi=120)
        print(f"figure: {FIGURE.relative_to(FIGURE.parent.parent.parent)}")
    print(f"wall time {time.perf_counter() - t_start:.1f} s ({len(refs)} reference solutions)")


if __name__ == "__main__":
    main()
