"""Are a trained 2-D model's samples as close to the data as fresh data is?  (issue 3's floor)

    python benchmarks/toy_quality.py runs/moons runs/gmm [--n 5000 --repeats 20 --steps 50]

For each run: the energy distance between n model samples (DDIM, EMA parameters) and n fresh data
points, for ``repeats`` seeds; next to it, the energy distance between two independent draws of n
data points, also ``repeats`` times.  The unbiased energy distance of two samples of the *same*
distribution averages 0 and scatters by its standard error; a model "at the data level" has a
mean within the data-vs-data spread (we report the z-score: (model mean - data mean) / data SD).
The same for MMD^2 (RBF kernel, median bandwidth).  Saves a scatter plot next to each run.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from minidiff.metrics import energy_distance, mmd_rbf
from minidiff.train.diffusion import Batches, load_denoiser

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"  # the README shows toy_quality_moons.png


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    for run in args.runs:
        den = load_denoiser(run)

        data = Batches(dataclasses.replace(den.config, cond="none"))
        start = time.perf_counter()
        model, base = {"ed": [], "mmd": []}, {"ed": [], "mmd": []}
        for r in range(args.repeats):
            x = den.sample(args.n, seed=r, sampler="ddim", steps=args.steps)
            ref, ref2 = data(10**9 + 2 * r, args.n)[0], data(10**9 + 2 * r + 1, args.n)[0]
            model["ed"].append(energy_distance(x, ref))
            model["mmd"].append(mmd_rbf(x, ref))
            base["ed"].append(energy_distance(ref2, ref))
            base["mmd"].append(mmd_rbf(ref2, ref))
        print(f"{run}: {den.config.data}, step {den.step}, n = {args.n}, {args.repeats} repeats, "
              f"DDIM {args.steps} steps ({time.perf_counter() - start:.0f} s)")
        for name in ("ed", "mmd"):
            m, b = np.array(model[name]), np.array(base[name])
            z = (m.mean() - b.mean()) / b.std(ddof=1)
            print(f"  {'energy distance' if name == 'ed' else 'MMD^2 (RBF)':16s} model vs data {m.mean():.2e} "
                  f"+- {m.std(ddof=1):.1e}   data vs data {b.mean():.2e} +- {b.std(ddof=1):.1e}   z = {z:+.2f}")

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
        for ax, pts, title in zip(axes, (x, ref), ("samples (DDIM 50)", "data")):
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.3)
            ax.set_title(f"{den.config.data}: {title}, n = {args.n}")
            ax.set_aspect("equal")
        for out in (Path(run) / "quality.png", FIGURES / f"toy_quality_{den.config.data}.png"):
            fig.savefig(out, dpi=90, bbox_inches="tight")
            print(f"  wrote {out}")

if __name__ == "__main__":
    main()
