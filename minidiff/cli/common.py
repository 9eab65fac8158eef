"""Small helpers the command families share."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # short names, at the CLI edge only


def prediction(name: str | None) -> str | None:
    """--prediction: the library's name for a short alias (eps, v, x0)."""
    return PREDICTION_ALIASES.get(name, name)


def default(cls, name: str):
    """A config dataclass field's default, without building the config (which may import JAX)."""
    import dataclasses

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def given(**kwargs) -> dict:
    """The options given on the command line (the config's own defaults fill the rest)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def json_arg(text, flag):
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON, e.g. '{{\"width\": 128}}': {e}") from None


def resume_dir(out) -> Path:
    """--resume: ``out`` must hold a checkpoint (never a silent fresh start)."""
    from ..train.checkpoint import CHECKPOINT

    out = Path(out)
    if not (out / CHECKPOINT).is_file():
        raise ValueError(f"--resume: {out} holds no checkpoint to continue; leave out --resume to start a new run")
    return out


def fresh_run_dir(out) -> Path:
    from ..train.checkpoint import CHECKPOINT

    out = Path(out)
    if (out / CHECKPOINT).is_file():
        raise ValueError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    return out


def print_metrics(title, metrics):
    print(title)
    for key, value in metrics.items():
        print(f"  {key:30s} {value:.6g}" if isinstance(value, float) else f"  {key:30s} {value}")


def write_history(out: Path, history: dict, extra: dict):
    (out / "history.json").write_text(json.dumps({**history, **extra}, indent=1, default=str) + "\n", encoding="utf-8")


# --- argument types: argparse reports their errors as "argument --seed: ..." before anything loads ---

MAX_SEED = 2**32 - 1  # as minidiff.pipeline.MAX_SEED (kept here so that a bad seed is caught without JAX)


def _checked(text: str, cast, what: str, ok, why: str):
    """``cast(text)`` if it parses and ``ok(value)``; else argparse's error (shown as "argument --x: ...")."""
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{text} {why}")
    return value


def seed(text: str) -> int:
    return _checked(text, int, "an integer", lambda v: 0 <= v <= MAX_SEED,
                    f"is out of range: seeds run from 0 to {MAX_SEED} (2**32 - 1)")


def finite(text: str) -> float:
    return _checked(text, float, "a number", math.isfinite, "is not a finite number")


def positive(text: str) -> int:
    return _checked(text, int, "an integer", lambda v: v >= 1, "must be at least 1")


def output_image(path: str, flag: str = "-o") -> Path:
    """The image file to write, checked before any work: a known type (no extension: .png), not a
    folder, in a place that can be written."""
    from ..files import check_writable
    from ..images import IMAGE_TYPES

    out = Path(path)
    if out.is_dir() or path.endswith(("/", "\\")):
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {out / 'image.png'}")
    if not out.suffix:
        out = out.with_name(out.name + ".png")
    elif out.suffix.lower() not in IMAGE_TYPES:
        raise ValueError(f"{flag} {path}: unknown image type {out.suffix!r}; use {', '.join(IMAGE_TYPES)}")
    check_writable(out.parent, f"{flag} {path}")
    return out


FSDP_HELP = ("shard the training over every device: the weights and optimizer state split in groups of N "
             "devices (FSDP), the batch over all of them (N must divide the device count)")


def mesh(fsdp: int | None):
    """The training mesh of ``--fsdp N`` (None without it): every device, FSDP groups of N."""
    if fsdp is None:
        return None
    from ..train.sharding import make_mesh

    return make_mesh(fsdp=fsdp)


def lora_argument(text: str) -> tuple[str, float]:
    """'style.safetensors:0.8' -> ('style.safetensors', 0.8); no ':SCALE' (or a path whose last ':'
    part is not a number): scale 1.0."""
    path, sep, scale = text.rpartition(":")
    if sep:
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the scale of --lora {text} must be a finite number")
        return path, value
    return text, 1.0
