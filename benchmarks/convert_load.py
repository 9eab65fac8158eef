"""Converting and loading SD 1.5-size weights: seconds and peak RSS per phase, next to the weights' size.

    python benchmarks/convert_load.py [--cache DIR] [--repeats 1]

Builds once (cached in --cache, default $TMPDIR/minidiff_bench) SD 1.5's architecture with random
weights (diffusers UNet + VAE, transformers CLIP text encoder; 1.07 G parameters, fp32) and saves it
as a diffusers folder and as an ldm single .safetensors file (tests/sd_fixtures.py).  Then each
phase runs in its own subprocess, so that its peak RSS (ru_maxrss) is its own:

    imports                python + numpy + jax + minidiff, nothing loaded (the floor under every phase)
    convert ldm            minidiff.convert.convert(single file) -> converted.safetensors + .json
    convert diffusers      the same from the diffusers folder
    fill                   the floor of any load: np.ones of the weights' size (fresh memory, written once)
    load_converted (mmap)  load_converted(converted.safetensors): views of the mapped file
    load_converted (copy)  load_converted(..., mmap=False): safetensors reads each tensor into its own array
    diffusers load         the reference: diffusers / transformers from_pretrained of unet, vae, text_encoder

Every load phase then reads one value per 4 KiB page of every weight, so that lazily mapped
weights count as loaded.  Seconds exclude the imports (the "imports" phase is only them).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def phase(name, cache: Path):
    """Run one phase in this process; print {"seconds", "peak_rss_gib"} as JSON (seconds without
    the imports, except for the "imports" phase, which is only them)."""
    start = time.perf_counter()
    import numpy as np

    import minidiff.convert as converter

    if name != "imports":
        start = time.perf_counter()
    if name == "imports":
        import jax  # noqa: F401
    elif name == "fill":  # the floor: fresh memory of the weights' size, written once
        np.ones((cache / "converted.safetensors").stat().st_size // 4, np.float32)
    elif name in ("convert ldm", "convert diffusers"):
        src = cache / ("sd15.safetensors" if name == "convert ldm" else "folder")
        dst = cache / ("converted.safetensors" if name == "convert ldm" else "converted_folder.safetensors")
        report = converter.convert(src, dst, overwrite=True)
        print(report, file=sys.stderr)
    elif name.startswith("load_converted"):
        params, config = converter.load_converted(cache / "converted.safetensors", mmap="mmap" in name)
        assert _touch(a for part in params.values() for a in _leaves(part)) > 4e9
    elif name == "diffusers load":
        import diffusers
        import transformers

        models = (diffusers.UNet2DConditionModel.from_pretrained(cache / "folder" / "unet"),
                  diffusers.AutoencoderKL.from_pretrained(cache / "folder" / "vae"),
                  transformers.CLIPTextModel.from_pretrained(cache / "folder" / "text_encoder"))
        assert _touch(p.detach().numpy() for m in models for p in m.parameters()) > 4e9
    else:
        raise ValueError(name)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}))


def _touch(arrays) -> int:
    """Read one value per 4 KiB page of every array (so that lazily mapped weights are really in
    memory); returns the bytes seen."""
    total = 0
    for a in arrays:
        flat = a.reshape(-1)
        float(flat[:: max(1, 4096 // flat.itemsize)].astype("float32").sum())
        total += a.nbytes
    return total


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def build(cache: Path):
    """The SD 1.5 random checkpoint in both layouts (skipped when the cache holds them)."""
    if (cache / "sd15.safetensors").is_file() and (cache / "folder" / "unet").is_dir():
        return
    sys.path.insert(0, str(ROOT / "tests"))
    import sd_fixtures as fx

    cache.mkdir(parents=True, exist_ok=True)
    unet, vae, text = fx.build_models(fx.SD15, perturb=False)
    fx.save_diffusers_folder(cache / "folder", unet, vae, text, "sd1")
    fx.save_ldm(fx.ldm_state_dict(unet, vae, text, "sd1"), cache / "sd15.safetensors")


def run_phase(name, cache):
    r = subprocess.run([sys.executable, __file__, "--phase", name, "--cache", str(cache)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "minidiff_bench")
    p.add_argument("--repeats", type=int, default=1, help="runs per phase (the best time is printed)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase == "build":  # in its own process, so that the torch models' memory is returned
        return build(args.cache)
    if args.phase:
        return phase(args.phase, args.cache)

    t = time.perf_counter()
    if subprocess.run([sys.executable, __file__, "--phase", "build", "--cache", str(args.cache)], cwd=ROOT).returncode:
        raise SystemExit("building the SD 1.5 checkpoint failed")
    print(f"checkpoint ready in {args.cache} ({time.perf_counter() - t:.0f} s)")
    single = args.cache / "sd15.safetensors"
    print(f"weights: {single.stat().st_size / 2**30:.2f} GiB fp32 (1,066,235,307 parameters: UNet, VAE, text encoder)")
    print(f"{'phase':20s} {'seconds':>8s} {'peak RSS GiB':>13s}")
    for name in ("imports", "convert ldm", "convert diffusers", "fill", "load_converted (mmap)",
                 "load_converted (copy)", "diffusers load"):
        results = [run_phase(name, args.cache) for _ in range(args.repeats)]
        best = min(results, key=lambda r: r[0]["seconds"])[0]
        print(f"{name:20s} {best['seconds']:8.1f} {best['peak_rss_gib']:13.2f}", flush=True)
        if name == "convert ldm":
            print("\n".join("    " + line for line in results[0][1].strip().splitlines()[-12:]), flush=True)
    converted = args.cache / "converted.safetensors"
    print(f"converted file: {converted.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
