"""Remake the small trained models that lessons 5, 6 and 10 ship, so that they run as notebooks at once.

    python lessons/checkpoints/build.py            # trains into runs/ (skipping finished runs), then copies

Each model is trained by the library's own command with its default settings (one CPU core: the VQ-VAE
and the dVAE about 20 minutes each, the VQGAN 30, DALL-E about 45), then copied here by
``minidiff.train.checkpoint.slim_checkpoint``: float16 weights without the optimizer's state.

    vqvae/   minidiff train-vqvae --out runs/vqvae                                  (lessons 5 and 6)
    dvae/    minidiff train-vqvae --out runs/dvae --restart-every 0 \\
                 --model-kwargs '{"quantizer": "gumbel"}'                            (lesson 5)
    vqgan/   minidiff train-vqvae --out runs/vqgan --adversarial-weight 0.05 \
                 --perceptual-weight 0.1 --disc-start 1000                           (lesson 5)
    dalle/   minidiff train-dalle --out runs/dalle --vqvae runs/vqvae --batch 32    (lesson 6; its VQ-VAE inside)
    lesson10/  a full run of lesson 10 keeps its textual-inversion vectors, LoRA files (float16) and their
             loss histories in runs/lesson10; copied as they are.  (Its DreamBooth UNets, 8 MB each, are not.)
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
HERE = Path(__file__).resolve().parent
RUNS = {
    "vqvae": ["train-vqvae", "--out", "runs/vqvae"],
    "dvae": ["train-vqvae", "--out", "runs/dvae", "--restart-every", "0", "--model-kwargs", json.dumps({"quantizer": "gumbel"})],
    "vqgan": ["train-vqvae", "--out", "runs/vqgan", "--adversarial-weight", "0.05", "--perceptual-weight", "0.1",
              "--disc-start", "1000"],
    "dalle": ["train-dalle", "--out", "runs/dalle", "--vqvae", "runs/vqvae", "--batch", "32"],
}

LESSON_RESULTS = {"lesson10": "10_textual_inversion_vs_dreambooth.py"}  # kept by the lesson's own full run


def main() -> None:
    from minidiff.train.checkpoint import CHECKPOINT, load_checkpoint, slim_checkpoint

    for name, command in RUNS.items():
        run = ROOT / "runs" / name
        if not (run / CHECKPOINT).is_file():
            subprocess.run([sys.executable, "-m", "minidiff.cli", *command], cwd=ROOT, check=True)
        state, config, _ = load_checkpoint(run)
        if int(state["step"]) < config["steps"]:  # a stopped run: continue it
            subprocess.run([sys.executable, "-m", "minidiff.cli", command[0], "--out", f"runs/{name}", "--resume"],
                           cwd=ROOT, check=True)
        path = slim_checkpoint(run, HERE / name)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 2**20:.2f} MiB")
    for name, lesson in LESSON_RESULTS.items():
        run = ROOT / "runs" / name
        if not (run / "history.json").is_file():  # written last by a full run
            subprocess.run([sys.executable, lesson], cwd=ROOT / "lessons", check=True)
        shutil.copytree(run, HERE / name, dirs_exist_ok=True)
        size = sum(f.stat().st_size for f in (HERE / name).iterdir())
        print(f"{(HERE / name).relative_to(ROOT)}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
