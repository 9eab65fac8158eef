"""Time one sampler step on an SD-sized latent batch: minidiff (NumPy, and JAX jit) next to
diffusers' DDIMScheduler / DDPMScheduler, measured in the same run.

    python benchmarks/scheduler_step.py [--batch 2] [--repeats 200]

Prints microseconds per step, the ratio to diffusers, and the peak RSS of the process.
The step is a handful of elementwise operations, so this measures array overhead, not maths.
"""

import argparse
import resource
import time

import numpy as np

from minidiff.diffusion import InferenceSchedule, ddim_step, ddpm_step


def per_call(fn, repeats):
    fn()  # warm up (and compile, for JAX)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    shape = (args.batch, 4, 64, 64)  # SD 1.x latents for 512x512 images
    rng = np.random.default_rng(0)
    x, out, z = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    isc = InferenceSchedule.stable_diffusion(50)
    i, t = 10, int(isc.timesteps[10])
    a, b = isc.alpha_bar_t[i], isc.alpha_bar_prev[i]
    rows = {}

    rows["DDIM eta=0", "minidiff NumPy"] = per_call(lambda: ddim_step(x, out, a, b), args.repeats)
    rows["DDIM eta=1", "minidiff NumPy"] = per_call(lambda: ddim_step(x, out, a, b, 1.0, z), args.repeats)
    rows["DDPM", "minidiff NumPy"] = per_call(lambda: ddpm_step(x, out, a, b, z), args.repeats)

    import jax
    import jax.numpy as jnp

    ab_t, ab_prev = jnp.asarray(isc.alpha_bar_t, jnp.float32), jnp.asarray(isc.alpha_bar_prev, jnp.float32)
    xj, oj, zj = jnp.asarray(x), jnp.asarray(out), jnp.asarray(z)
    f0 = jax.jit(lambda x, o, i: ddim_step(x, o, ab_t[i], ab_prev[i])[0])
    f1 = jax.jit(lambda x, o, z, i: ddim_step(x, o, ab_t[i], ab_prev[i], 1.0, z)[0])
    f2 = jax.jit(lambda x, o, z, i: ddpm_step(x, o, ab_t[i], ab_prev[i], z)[0])
    rows["DDIM eta=0", "minidiff JAX jit"] = per_call(lambda: f0(xj, oj, i).block_until_ready(), args.repeats)
    rows["DDIM eta=1", "minidiff JAX jit"] = per_call(lambda: f1(xj, oj, zj, i).block_until_ready(), args.repeats)
    rows["DDPM", "minidiff JAX jit"] = per_call(lambda: f2(xj, oj, zj, i).block_until_ready(), args.repeats)

    try:
        import diffusers
        import torch
    except ImportError:
        diffusers = None
    if diffusers is not None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        sd = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
        ddim = diffusers.DDIMScheduler(set_alpha_to_one=False, **sd)
        ddim.set_timesteps(50)
        ddpm = diffusers.DDPMScheduler(**sd)
        ddpm.set_timesteps(50)
        xt, ot, zt = torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(z)
        gen = torch.Generator().manual_seed(0)
        rows["DDIM eta=0", "diffusers"] = per_call(lambda: ddim.step(ot, t, xt), args.repeats)
        rows["DDIM eta=1", "diffusers"] = per_call(lambda: ddim.step(ot, t, xt, eta=1.0, variance_noise=zt), args.repeats)
        rows["DDPM", "diffusers"] = per_call(lambda: ddpm.step(ot, t, xt, generator=gen), args.repeats)

    print(f"one sampler step on latents {shape} float32, microseconds per call")
    print(f"{'step':12s} {'minidiff NumPy':>15s} {'minidiff JAX jit':>17s} {'diffusers':>10s} {'NumPy/diffusers':>16s} {'JAX/diffusers':>14s}")
    for step in ("DDIM eta=0", "DDIM eta=1", "DDPM"):
        n, j, d = rows[step, "minidiff NumPy"], rows[step, "minidiff JAX jit"], rows.get((step, "diffusers"))
        ds = f"{d:10.0f} {n / d:16.2f} {j / d:14.2f}" if d else f"{'-':>10s}"
        print(f"{step:12s} {n:15.0f} {j:17.0f} {ds}")
    print("(the diffusers DDPM step also draws its noise; minidiff's is given the noise)")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
