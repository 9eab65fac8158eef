"""Wall time of ``minidiff txt2img`` from the shell, first run (empty compile cache: everything compiles)
against the second (the compiled programs read back from the cache), for the built-in model and for
an SD 1.5-size model (random weights, written once as a converted file), plus where the start goes.

    python benchmarks/startup.py [--sd-size 128] [--sd-steps 2] [--no-sd]

Each run is a fresh process with its own new cache folder for the first run, shared by the second.
The SD 1.5-size model is benchmarks/txt2img.py's file of random weights (written the first time).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EXE = [sys.executable, "-m", "minidiff.cli"]


def wall(args, cache) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(EXE + args + ["--compile-cache", str(cache), "--no-progress"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr[-2000:])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd-size", type=int, default=128)
    ap.add_argument("--sd-steps", type=int, default=2)
    ap.add_argument("--no-sd", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minidiff-startup-"))

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import minidiff.cli"], check=True)
    t_cli = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jnp.zeros(1).block_until_ready()"], check=True)
    t_jax = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import minidiff.pipeline"], check=True)
    t_pipe = time.perf_counter() - t0
    print(f"python + import minidiff.cli: {t_cli:.2f} s; + jax and a first array: {t_jax:.2f} s; "
          f"import minidiff.pipeline: {t_pipe:.2f} s")

    runs = [("built-in model (32x32, Euler a, 6 steps)", ["txt2img", "a red circle in the top left"])]
    if not args.no_sd:
        from txt2img import MODEL_FILE, minidiff_pipeline

        if not Path(MODEL_FILE).is_file():
            minidiff_pipeline()  # writes it
        model = MODEL_FILE
        runs.append((f"SD 1.5 size ({args.sd_size}x{args.sd_size}, DPM++ 2M Karras, {args.sd_steps} steps)",
                     ["txt2img", "a lighthouse", "--model", str(model), "--height", str(args.sd_size), "--width",
                      str(args.sd_size), "--steps", str(args.sd_steps)]))
    print("| model | first run (compiles) | second run (cache) | without the cache |")
    print("|---|---|---|---|")
    for name, argv in runs:
        cache = Path(tempfile.mkdtemp(prefix="minidiff-cache-"))
        argv = argv + ["-o", str(work / "out.png")]
        first, second = wall(argv, cache), wall(argv, cache)
        off = wall(argv + ["--no-compile-cache"], cache)
        print(f"| {name} | {first:.1f} s | {second:.1f} s | {off:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
