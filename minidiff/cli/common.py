"""Small helpers the command families share."""

from __future__ import annotations

import json
from pathlib import Path

PREDICTION_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # short names, at the CLI edge only


def prediction(name: str | None) -> str | None:
    """--prediction: the library's name for a short alias (eps, v, x0)."""
    return PREDICTION_ALIASES.get(name, name)


def given(**kwargs) -> dict:
    """The options given on the command line (the config's own defaults fill the rest)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def json_arg(text, flag):
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be JSON, e.g. '{{\"width\": 128}}': {e}") from None


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
