"""The built-in mini model's prompt following per sampler and step count (issue 17, item 5).

    python benchmarks/mini_sd_samplers.py [--samples-per-prompt 1] [--guidance 3] [--steps 6 10 15 20 30]
                                          [--only "dpmpp_2m karras" "unipc"] [--skip-30 heun ...]

The same measurement as ``minidiff evaluate-mini-sd --sampler S --sigmas G --steps N --guidance 3``
(evaluate_prompt_following: 108 prompts x samples-per-prompt, the shapes classifier reads shape,
colour and position), with the pipeline loaded once.  Prints one row per (sampler, sigmas): "all
three right" at each step count, then NFE (model evaluations per picture; each is one batched
call, conditional and unconditional together) and wall seconds of the row (JIT compile included).
"""

import argparse
import sys
import time

GRID = [("ddim", None), ("euler", None), ("euler_a", None), ("heun", None), ("lms", None), ("plms", None),
        ("dpmpp_2m", None), ("dpmpp_2m", "karras"), ("dpmpp_2m_sde", "karras"), ("unipc", None)]


def nfe(sampler, steps):
    """Model evaluations per picture as run: the rows of the sampler's tables times its calls per row
    (PLMS: N + 1 rows; Heun: 2 N, its last step's second call a throwaway kept for one graph)."""
    from minidiff.diffusion.solvers import SOLVERS

    if sampler in ("ddim", "ddpm"):
        return steps
    return SOLVERS[sampler].evaluations_per_row * steps + (1 if sampler == "plms" else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples-per-prompt", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--steps", type=int, nargs="+", default=[6, 10, 15, 20, 30])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", help='rows to run, e.g. "dpmpp_2m karras" unipc (default: the whole grid)')
    ap.add_argument("--skip-30", nargs="*", default=[], help="samplers measured without 30 steps (to save time)")
    ap.add_argument("--lcm", action="store_true", help="add one LCM row at 4 and 8 steps (the model is not distilled)")
    args = ap.parse_args()

    from minidiff.pipeline import load_pipeline
    from minidiff.train.mini_sd import evaluate_prompt_following

    grid = GRID if not args.only else [tuple(o.split()) if " " in o else (o, None) for o in args.only]
    rows = [(s, g, [n for n in args.steps if not (n == 30 and s in args.skip_30)]) for s, g in grid]
    if args.lcm:
        rows.append(("lcm", None, [4, 8]))
    pipe = load_pipeline()
    n = 108 * args.samples_per_prompt
    print(f"{pipe.name}: 'all three right' (shape, colour, position) over {n} pictures, guidance {args.guidance:g}, "
          f"seed {args.seed}", flush=True)
    print(f"{'sampler':24s} " + " ".join(f"{s:>12d}" for s in args.steps) + "   wall s", flush=True)
    start = time.perf_counter()
    for sampler, sigmas, steps in rows:
        t0, cells = time.perf_counter(), []
        for s in args.steps:
            if s not in steps:
                cells.append(f"{'-':>12s}")
                continue
            m, _ = evaluate_prompt_following(pipe, samples_per_prompt=args.samples_per_prompt, steps=s,
                                             guidance_scale=args.guidance, seed=args.seed, sampler=sampler,
                                             sigmas=sigmas)
            cells.append(f"{m['joint']:6.1%} ({nfe(sampler, s):2d})")
            print(f"  {sampler} {sigmas or 'default'} {s}: joint {m['joint']:.3f} shape {m['shape']:.3f} "
                  f"colour {m['color']:.3f} position {m['position']:.3f} held-out {m['joint_held_out']}",
                  file=sys.stderr, flush=True)
        name = sampler + ("" if sigmas in (None, "default") else f" {sigmas}")
        print(f"{name:24s} " + " ".join(cells) + f"   {time.perf_counter() - t0:6.0f}", flush=True)
    print(f"cells: all three right (NFE); total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
