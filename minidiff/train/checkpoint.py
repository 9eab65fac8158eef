"""Training checkpoints: one msgpack file per run folder, written atomically.

    RUN/checkpoint.msgpack = {"state": {"step", "params", "ema_params", "opt_state", "key", ...},
                              "config": JSON text of the training configuration, "meta": JSON text}

Written with :func:`minidiff.files.atomic_write`, so a run killed mid-write keeps the previous
checkpoint (and the next save removes the dead run's temporary file).  ``RUN/config.json`` is a readable copy, never
needed to load.  Parameters come back as plain nested dicts; optimizer states (tuples of optax
NamedTuples) need a template of the same structure (``target``) to come back exactly.

:func:`slim_checkpoint` writes the small copy of a finished run that the lessons ship: the weights
only (no optimizer state), in float16; :func:`load_checkpoint` reads them back as float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import serialization

from ..files import atomic_write

CHECKPOINT = "checkpoint.msgpack"
CONFIG = "config.json"


def save_checkpoint(run_dir, state, config: dict, meta: dict | None = None) -> Path:
    """Save a training state (a pytree of arrays) with its configuration into ``run_dir``."""
    run_dir = Path(run_dir)
    config_text = json.dumps(config, indent=2, sort_keys=True)
    blob = serialization.to_bytes({"state": state, "config": config_text, "meta": json.dumps(meta or {})})
    atomic_write(run_dir / CONFIG, (config_text + "\n").encode())
    return atomic_write(run_dir / CHECKPOINT, blob)


def checkpoint_path(run_dir) -> Path:
    """``run_dir/checkpoint.msgpack``, or ``run_dir`` itself if it is the file; ValueError if absent."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"no checkpoint found at {path}")
    return path


def load_checkpoint(run_dir, target=None):
    """Read a checkpoint: returns (state, config dict, meta dict).

    Without ``target`` the state is nested dicts of NumPy arrays; with it (a pytree of the saved
    structure, e.g. a freshly initialised training state) the state has the target's structure
    (optax NamedTuples included) and its leaves are the saved values.
    """
    path = checkpoint_path(run_dir)
    try:
        raw = serialization.msgpack_restore(path.read_bytes())
        state, config, meta = raw["state"], json.loads(raw["config"]), json.loads(raw.get("meta", "{}"))
    except Exception as e:  # truncated or foreign file: msgpack/KeyError/JSON errors
        raise ValueError(f"{path} is not a minidiff checkpoint (or is damaged): {type(e).__name__}: {e}") from None
    if meta.get("slim"):  # float16 on disk, float32 to compute with
        state = _cast(state, np.float16, np.float32)
    if target is not None:
        try:
            state = serialization.from_state_dict(target, state)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path} does not match the model built from its config: {e}") from None
        _check_shapes(target, state, path)
    return state, config, meta


def _check_shapes(target, state, path):
    import jax

    for (where, want), got in zip(jax.tree_util.tree_leaves_with_path(target), jax.tree_util.tree_leaves(state)):
        if np.shape(want) != np.shape(got):
            raise ValueError(f"{path}: {jax.tree_util.keystr(where)} has shape {np.shape(got)}, "
                             f"the model expects {np.shape(want)}")


def _cast(tree, old, new):
    """Every ``old``-dtype array of the tree as ``new``; other leaves (integer counters) as they are."""
    import jax

    return jax.tree.map(lambda a: a.astype(new) if np.asarray(a).dtype == old else a, tree)


SLIM_KEEP = ("step", "params", "model_state", "attachments")  # what a model needs; not the optimizer's moments


def slim_checkpoint(run_dir, out_dir) -> Path:
    """Copy a run's weights into ``out_dir`` as a checkpoint without optimizer state, floats as float16
    (about a sixth of the file: Adam keeps two moments per weight).  It loads like the run for
    sampling and evaluation (``load_vqvae``, ``load_dalle``), not for resuming training."""
    state, config, meta = load_checkpoint(run_dir)
    slim = {k: v for k, v in state.items() if k in SLIM_KEEP}
    slim = _cast(slim, np.float32, np.float16)
    return save_checkpoint(out_dir, slim, config, {**meta, "slim": True})
