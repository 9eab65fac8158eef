"""Textual inversion, DreamBooth and LoRA at ranks 1, 4 and 16 on the same subject, measured in one run.

Each method is trained by its command (``minidiff textual-inversion`` / ``dreambooth`` / ``lora``, 300
steps, the defaults) in its own process, for its wall time and peak RSS; then every result is judged
on the built-in model the way ``minidiff evaluate-finetune ring`` does (every place, 5 never shown;
2 pictures per prompt, 30 DDIM steps, guidance 7.5):

    file          bytes of what must be kept (the embedding, the LoRA file, the UNet in float16)
    red ring      "a red [V] circle <place>": a red ring in the right place          (18 pictures)
    other colour  "a <green|blue|yellow> [V] circle <place>": a ring of that colour  (54 pictures)
    class drift   "a red circle <place>" drawn as a ring                              (18 pictures)
    class right   "a <colour> circle <place>": shape, colour and place as asked      (72 pictures)

    python benchmarks/finetune_methods.py [--quick] [--out DIR]

Prints a Markdown table (the README's) and writes DIR/finetune_methods.json and
docs/figures/10_methods.png (a bar chart with binomial standard errors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNNER = r'''
import json, resource, sys, time
from minidiff.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
print("RESULT " + json.dumps({"rc": rc, "wall": time.perf_counter() - t,
                              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''

METHODS = [  # name, command, extra arguments, what is kept
    ("textual inversion", "textual-inversion", ["--token", "<ring>", "--init-word", "circle"], "learned_embeds.safetensors"),
    ("DreamBooth + prior", "dreambooth", [], "unet"),
    ("DreamBooth, no prior", "dreambooth", ["--no-prior"], "unet"),
    ("LoRA r=1 + prior", "lora", ["--rank", "1"], "lora.safetensors"),
    ("LoRA r=4 + prior", "lora", ["--rank", "4"], "lora.safetensors"),
    ("LoRA r=16 + prior", "lora", ["--rank", "16"], "lora.safetensors"),
]


def train(name, command, extra, subject, out, steps):
    args = [command, str(subject), "--out", str(out), "--no-progress", "--no-samples", *extra]
    if steps:
        args += ["--steps", str(steps)]
    if steps and command != "textual-inversion":
        args += ["--class-images", "1"]
    r = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    if r.returncode != 0 or "RESULT " not in r.stdout:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    result = json.loads(r.stdout.split("RESULT ")[-1])
    history = json.loads((out / "history.json").read_text())
    return {**result, "train_seconds": history["seconds"]}


def judged(name, out, kind, quick):
    from minidiff.pipeline import load_pipeline
    from minidiff.train import finetune as F

    samples, steps = (1, 4) if quick else (2, 30)
    if kind == "unet":
        pipe, word = load_pipeline(out / "model.safetensors"), "sks"
    else:
        pipe = load_pipeline()
        if kind.startswith("learned"):
            word = pipe.load_textual_inversion(out / kind)[0]
        else:
            pipe.load_lora(out / kind)
            word = "sks"
    fid, _ = F.evaluate_subject(pipe, "ring", word, samples=samples, steps=steps)
    cls = F.evaluate_class(pipe, samples=samples, steps=steps)
    return {**fid, **cls}


def kept_bytes(out, kind):
    if kind != "unet":
        return (out / kind).stat().st_size
    from minidiff.convert import load_converted

    params, _ = load_converted(out / "model.safetensors")
    return int(sum(np.size(a) for a in __import__("jax").tree.leaves(params["unet"])) * 2)  # float16


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 steps, 1 picture per prompt, 4 DDIM steps")
    ap.add_argument("--out", default="/tmp/minidiff-bench/finetune_methods")
    ap.add_argument("--only", nargs="*", help="method names to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from minidiff.cli import main as cli

    subject = out / "subject_ring"
    cli(["draw-subject", "ring", "--out", str(subject)])
    results_path = out / "finetune_methods.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, command, extra, kind in METHODS:
        if args.only and name not in args.only:
            continue
        run = out / name.replace(" ", "_").replace(",", "").replace("+", "p").replace("=", "")
        start = time.perf_counter()
        cost = train(name, command, extra, subject, run, 6 if args.quick else None)
        quality = judged(name, run, kind, args.quick)
        results[name] = {**cost, **quality, "bytes": kept_bytes(run, kind)}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    report(results, out)


def se(p, n):
    return np.sqrt(max(p * (1 - p), 1e-9) / n)


def report(results, out):
    print("| method | bytes to keep | training (wall, with start-up) | peak RSS | red ring, right place | ring in other "
          "colours | 'a red circle' drawn as a ring | coloured circles right |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n_subject, n_other, n_class = r["n"] * 18 // (18 + 54), r["n"] * 54 // (18 + 54), r["class_n"]
        print(f"| {name} | {r['bytes']:,} | {r['train_seconds']:.0f} s ({r['wall']:.0f} s) | {r['peak_rss_gb']:.1f} GB "
              f"| {r['ring_red_placed']:.0%} (n={n_subject}) | {r['other_colours_ring_right_colour']:.0%} (n={n_other}) "
              f"| {r['class_prompt_rings']:.0%} (n={n_class // 4}) | {r['coloured_circles_right']:.0%} (n={n_class}) |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metrics = [("ring_red_placed", "red ring, right place", 18 / 72, "n"),
               ("other_colours_ring_right_colour", "ring in other colours", 54 / 72, "n"),
               ("class_prompt_rings", "'a red circle' -> ring (drift)", 0.25, "class_n"),
               ("coloured_circles_right", "coloured circles right", 1.0, "class_n")]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        r = results[name]
        vals = [r[m] for m, *_ in metrics]
        errs = [se(r[m], max(1, int(r[nk] * f))) for m, _, f, nk in metrics]
        ax.bar(np.arange(len(metrics)) + (i - (len(names) - 1) / 2) * w, vals, w, yerr=errs, capsize=2,
               label=f"{name} ({r['bytes'] / 1024:,.0f} KB, {r['train_seconds']:.0f} s)")
    ax.set_xticks(range(len(metrics)), [label for _, label, *_ in metrics], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction (error bars: binomial SE)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("the ring subject on the built-in model: three ways to teach it (benchmarks/finetune_methods.py)",
                 fontsize=9)
    fig.tight_layout()
    figures = Path(__file__).resolve().parent.parent / "docs" / "figures"
    fig.savefig(figures / "10_methods.png", dpi=110)
    fig.savefig(out / "10_methods.png", dpi=110)
    print(f"wrote {figures / '10_methods.png'}")


if __name__ == "__main__":
    main()
