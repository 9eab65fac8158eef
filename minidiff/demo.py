"""``minidiff demo``: the foundation at work, in two pictures.

1. A photograph noised by the forward process, q(x_t | x0), at increasing t.
2. A 2-D Gaussian mixture sampled back from pure noise by DDPM (1000 steps) and DDIM (50 steps),
   using the mixture's exact noise predictor (so what you see is the sampler, not a network).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import TOY_MIXTURE  # the 2-D toy data of the demo and lesson 02
from .diffusion import InferenceSchedule, NoiseSchedule, q_sample, sample
from .images import example_photo, load_image, save_image, to_uint8, to_unit_range


def noise_strip(image01, schedule: NoiseSchedule, timesteps, rng) -> np.ndarray:
    """The image at each t in ``timesteps`` (x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps), side by side."""
    x0 = to_unit_range(image01)
    eps = rng.standard_normal(x0.shape)  # one eps for all t: the same noise, growing
    return np.concatenate([to_uint8(q_sample(x0, schedule.alpha_bar[t], eps)) for t in timesteps], axis=1)


def run(out: str | Path = "outputs/demo", image: str | None = None, quick: bool = False, seed: int = 0) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sched = NoiseSchedule.from_name("linear")
    files = {}

    # 1. forward noising of a photograph
    photo = load_image(image, size=128) if image else example_photo("chelsea", size=128)
    ts = [0, 25, 50, 100, 200, 400, 999]
    strip = noise_strip(photo, sched, ts, rng)
    files["noising"] = save_image(out / "forward_noising.png", strip,
                                {"timesteps": ts, "schedule": "linear", "seed": seed, "image": image or "chelsea"})

    # 2. sampling the 2-D mixture back with DDPM and DDIM
    n = 2000 if quick else 10_000
    eps_fn = lambda x, t: TOY_MIXTURE.eps_oracle(x, sched.alpha_bar[t])  # noqa: E731
    data, _ = TOY_MIXTURE.sample(n, rng)
    runs = {}
    for name, sampler, steps in (("DDPM, 1000 steps", "ddpm", 1000), ("DDIM, 50 steps", "ddim", 50)):
        if quick:
            steps = min(steps, 100)
            name = f"{sampler.upper()}, {steps} steps"
        isc = InferenceSchedule.create(sched, steps)
        runs[name] = sample(eps_fn, rng.standard_normal((n, 2)), isc, sampler, rng=rng, progress=not quick)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, {"data (Gaussian mixture)": data, **runs}.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.suptitle("Reverse diffusion with the exact noise predictor")
    fig.tight_layout()
    files["samples"] = out / "samples_2d.png"
    fig.savefig(files["samples"], dpi=100)
    plt.close(fig)

    for name, pts in runs.items():
        k = TOY_MIXTURE.responsibilities(pts).argmax(1)
        w = np.bincount(k, minlength=3) / len(pts)
        print(f"{name}: component weights {np.round(w, 3)} (true {TOY_MIXTURE.weights})")
    for f in files.values():
        print(f"wrote {f}")
    return files
