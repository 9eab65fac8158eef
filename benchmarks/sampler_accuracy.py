"""Measure what the oracle and parity tests assert, with larger samples, and print a table.

    python benchmarks/sampler_accuracy.py [--n 200000]

1. Sampler error with the exact noise predictor of a Gaussian mixture (1-D and 2-D):
   weights, means and covariances of DDPM (1000 steps) and DDIM (50 steps) samples.
2. DDIM inversion round trip error for several step counts.
3. Max step-output differences against diffusers' DDPMScheduler / DDIMScheduler (if installed).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from test_samplers import MIX_1D, MIX_2D  # noqa: E402  (the mixtures the tests use)

from minidiff.diffusion import InferenceSchedule, NoiseSchedule, ddim_invert, ddim_step, ddpm_step, sample  # noqa: E402


def mixture_errors(gm, x):
    k = gm.responsibilities(x).argmax(1)
    rows = []
    for j, w in enumerate(gm.weights):
        xj = x[k == j]
        c = np.cov(xj.T).reshape(gm.covariances[j].shape)
        rows.append((len(xj) / len(x) - w, np.abs(xj.mean(0) - gm.means[j]).max(),
                     np.linalg.norm(c - gm.covariances[j]) / np.linalg.norm(gm.covariances[j])))
    return np.array(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    s = NoiseSchedule.from_name("linear")
    rng = np.random.default_rng(0)

    print(f"1. Oracle sampling, n = {args.n:,}, linear schedule (max over components)")
    print(f"   {'mixture':8s} {'sampler':14s} {'|weight err|':>12s} {'|mean err|':>11s} {'cov rel err':>12s} {'time':>7s}")
    for gname, gm in (("1-D", MIX_1D), ("2-D", MIX_2D)):
        for sampler, steps in (("ddpm", 1000), ("ddim", 50)):
            t0 = time.perf_counter()
            x = sample(lambda x, t: gm.eps_oracle(x, s.alpha_bar[t]), rng.standard_normal((args.n, gm.dim)),
                       InferenceSchedule.create(s, steps), sampler, rng=rng)
            e = np.abs(mixture_errors(gm, x)).max(0)
            print(f"   {gname:8s} {sampler.upper() + ' ' + str(steps):14s} {e[0]:12.4f} {e[1]:11.4f} {e[2]:12.4f} "
                  f"{time.perf_counter() - t0:6.1f}s")

    print("\n2. DDIM inversion round trip, 2-D mixture, 2000 points: RMS |x0 - DDIM(invert(x0))|")
    x0, _ = MIX_2D.sample(2000, rng)
    eps = lambda x, t: MIX_2D.eps_oracle(x, s.alpha_bar[t])  # noqa: E731
    for steps in (50, 200, 1000):
        isc = InferenceSchedule.create(s, steps)
        err = sample(eps, ddim_invert(eps, x0, isc), isc, "ddim") - x0
        print(f"   {steps:5d} steps: RMS {np.sqrt(np.mean(err ** 2)):.4f}   max {np.abs(err).max():.4f}")

    try:
        import diffusers
        import torch
    except ImportError:
        print("\n3. diffusers not installed: skipping parity")
        return
    print("\n3. Parity with diffusers: max abs difference of x_prev over all 50 steps, float64 inputs,")
    print("   with diffusers' own alpha_bar values (the formulas) / with minidiff's float64 tables (adds table drift)")
    sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    for cname, dcfg, ours in (("SD", sd, ("scaled_linear", 1, False, None)), ("defaults", {}, ("linear", 0, True, 1.0))):
        sched = NoiseSchedule.from_name(ours[0])
        for kind in ("ddim", "ddpm"):
            for pt in ("epsilon", "v_prediction"):
                if kind == "ddim":
                    ref = diffusers.DDIMScheduler(prediction_type=pt, set_alpha_to_one=ours[2], **dcfg)
                    final = float(ref.final_alpha_cumprod)
                else:
                    ref = diffusers.DDPMScheduler(prediction_type=pt, **dcfg)
                    final = 1.0
                ref.set_timesteps(50)
                isc = InferenceSchedule.create(sched, 50, "leading", ours[1], final == 1.0)
                ab_ref = ref.alphas_cumprod.double().numpy()[isc.timesteps]
                tables = {"diffusers": (ab_ref, np.append(ab_ref[1:], final)), "minidiff": (isc.alpha_bar_t, isc.alpha_bar_prev)}
                worst = dict.fromkeys(tables, 0.0)
                for i, t in enumerate(isc.timesteps):
                    x, out = (rng.standard_normal((2, 4, 16, 16)) for _ in range(2))
                    if kind == "ddim":
                        z = rng.standard_normal(x.shape)
                        r = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x), eta=1.0,
                                     variance_noise=torch.from_numpy(z)).prev_sample.numpy()
                    else:
                        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64).numpy()
                        r = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x),
                                     generator=torch.Generator().manual_seed(i)).prev_sample.numpy()
                    for name, (a, b) in tables.items():
                        if kind == "ddim":
                            o = ddim_step(x, out, a[i], b[i], 1.0, z, pt, ours[3])[0]
                        else:
                            o = ddpm_step(x, out, a[i], b[i], z, "beta_tilde", pt, ours[3])[0]
                        worst[name] = max(worst[name], np.abs(o - r).max())
                print(f"   {cname:9s} {kind.upper()} {pt:13s} {worst['diffusers']:.1e} / {worst['minidiff']:.1e}")


if __name__ == "__main__":
    main()
