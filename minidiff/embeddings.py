"""Textual-inversion embedding files: one learned word, one vector.

The layout is diffusers' ``learned_embeds.safetensors``: one tensor named by its token, shape
(1, D) (D = the text encoder's width: 768 for SD 1.x), settings in the file's metadata.  diffusers'
files and A1111's (one tensor "emb_params") load too.  ``StableDiffusion.load_textual_inversion``
adds the word to a pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .files import atomic_write

FORMAT = "minidiff-textual-inversion-v1"


def save_embedding(path, token: str, vector, metadata: dict | None = None) -> Path:
    """Write one learned embedding: a safetensors file {token: (1, D) float32}, settings in its metadata."""
    from safetensors.numpy import save_file

    meta = {"format": FORMAT, "token": token, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    tensors = {token: np.asarray(vector, np.float32).reshape(1, -1)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_embedding(path, token: str | None = None, hidden_size: int | None = None) -> dict[str, np.ndarray]:
    """{token: (D,) float32} from an embedding file: minidiff's or diffusers' (one tensor named by its
    token), or an A1111 ``.safetensors`` ("emb_params"; give ``token``).  ``token`` renames it;
    ``hidden_size`` checks D against the text encoder that will use it."""
    from safetensors import safe_open

    from .tensorfiles import safetensors_file

    path = safetensors_file(path, "embedding")
    try:
        with safe_open(str(path), "numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from None
    if len(tensors) != 1:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({sorted(tensors)[:5]}); an embedding file holds "
                         "one, named by its token")
    (name, vector), = tensors.items()
    if name == "emb_params" and token is None:
        raise ValueError(f"{path} is an A1111 embedding (its tensor is 'emb_params', not a token): give the token "
                         "to use in prompts, e.g. --token '<style>'")
    vector = np.asarray(vector, np.float32)
    if vector.ndim == 2 and vector.shape[0] != 1:
        raise ValueError(f"{path} holds {vector.shape[0]} vectors for one token; only single-vector embeddings "
                         "are supported")
    vector = vector.reshape(-1)
    if hidden_size is not None and vector.size != hidden_size:
        raise ValueError(f"{path}: the embedding has {vector.size} numbers but this model's text encoder is "
                         f"{hidden_size} wide (was it learned for another model?)")
    return {token or name: vector}


def embedding_metadata(path) -> dict:
    """The settings stored in a minidiff embedding file."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as f:
        meta = f.metadata() or {}
    return {k: (v if k in ("format", "token") else json.loads(v)) for k, v in meta.items()}
