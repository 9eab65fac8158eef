"""Textual inversion (Gal et al. 2022): teach a frozen text-to-image model a new word by learning
one embedding vector, and nothing else.

    tokenizer:  "<ring>" -> a new id v = 49408 (after CLIP's 49,408 ids)
    text table: E (49408, D) -> [E; e_v] (49409, D),  e_v initialised from a word ("red")
    caption:    "a <ring> circle in the top left" -> CLIP([E; e_v]) -> context c(e_v)
    learn:      e_v* = argmin_{e_v} E_{x, t, eps} || target - UNet(z_t, t, c(e_v)) ||^2      (UNet, VAE, CLIP frozen)

Only e_v is an optax parameter: the loss writes it into the frozen table (``table.at[v].set(e_v)``),
so every other weight is bit-identical by construction, and the result is a file of D numbers
(64 for the built-in model, 768 for SD 1.x: 3 KB), loaded with ``minidiff txt2img --embedding``.
A prompt without the new word tokenizes to the same ids as before and gives the same picture.

What it cannot do: the UNet is frozen, so the word can only steer the model to pictures it can
already draw.  A new colour between two it knows is in reach; a new look (a ring, when it only ever
drew filled discs) is not: that is DreamBooth's job (:mod:`minidiff.train.dreambooth`).

The file is diffusers' ``learned_embeds.safetensors`` layout: one tensor named by the token,
shape (1, D); diffusers' own files load here too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax

from ..nn.clip import CLIPTextConfig, CLIPTextModel
from .finetune import Subject, encode_subject, fit, float32, latent_loss_fn

FORMAT = "minidiff-textual-inversion-v1"


def add_token_rows(text_params, text_config: CLIPTextConfig, rows) -> tuple[dict, CLIPTextConfig]:
    """The text encoder with ``rows`` (k, D) appended to its token table (ids vocab_size .. + k - 1)."""
    table = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
    if np.size(rows) % table.shape[1]:
        raise ValueError(f"a new token's embedding must have {table.shape[1]} numbers (the text encoder's width)")
    rows = np.asarray(rows, table.dtype).reshape(-1, table.shape[1])
    if len(table) != text_config.vocab_size:
        raise ValueError(f"the token table has {len(table)} rows but the config says vocab_size "
                         f"{text_config.vocab_size}")
    embeddings = {**text_params["embeddings"], "token_embedding": {"embedding": np.concatenate([table, rows])}}
    return {**text_params, "embeddings": embeddings}, replace(text_config, vocab_size=len(table) + len(rows))


# --- the file ----------------------------------------------------------------------------------------

def save_embedding(path, token: str, vector, metadata: dict | None = None) -> Path:
    """Write one learned embedding: a safetensors file {token: (1, D) float32}, settings in its metadata."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "token": token, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
    save_file({token: np.asarray(vector, np.float32).reshape(1, -1)}, str(path), metadata=meta)
    return path


def load_embedding(path, token: str | None = None, hidden_size: int | None = None) -> dict[str, np.ndarray]:
    """{token: (D,) float32} from an embedding file: minidiff's or diffusers' (one tensor named by its
    token), or an A1111 ``.safetensors`` ("emb_params"; give ``token``).  ``token`` renames it;
    ``hidden_size`` checks D against the text encoder that will use it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"embedding file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: embeddings are read from .safetensors files (a .bin/.pt pickle can be "
                         "re-saved with safetensors.torch.save_file)")
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


# --- training ------------------------------------------------------------------------------------------

@dataclass
class TextualInversionConfig:
    token: str = "<orange>"  # the new word, as typed in prompts
    init_word: str = "red"  # its embedding starts as this word's (one token)
    steps: int = 300
    lr: float = 1e-2
    batch: int = 8  # pictures per step, drawn with replacement from the subject's few
    seed: int = 0


def table_with(text_params, token_id: int, vector):
    """The text encoder's parameters with row ``token_id`` of the token table set to ``vector``:
    the only place the trained vector enters the model (works on traced arrays)."""
    table = text_params["embeddings"]["token_embedding"]["embedding"]
    embeddings = {**text_params["embeddings"], "token_embedding": {"embedding": table.at[token_id].set(vector)}}
    return {**text_params, "embeddings": embeddings}


def train_textual_inversion(pipe, subject: Subject, config: TextualInversionConfig | None = None,
                            progress: bool = True, checkpoint=None, checkpoint_every: int = 0):
    """Learn the embedding of ``config.token`` from the subject's pictures and captions.

    Returns (vector (D,) float32, history).  ``pipe`` is left unchanged (the token is added to a copy
    of its tokenizer and text encoder for the training)."""
    cfg = config or TextualInversionConfig()
    init = pipe.tokenizer.encode(cfg.init_word)
    if len(init) != 1:
        raise ValueError(f"the initial word must be one token of the vocabulary, {cfg.init_word!r} is {len(init)}")
    if cfg.token in pipe.tokenizer.encoder:
        raise ValueError(f"{cfg.token!r} is already a token of this model; choose a new one")
    for name in ("steps", "batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    table = np.asarray(pipe.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"], np.float32)

    work = pipe.with_params()  # its own params dict and placement (add_tokens copies the tokenizer)
    work.add_tokens({cfg.token: table[init[0]]})
    token_id = work.tokenizer.encoder[cfg.token]
    ids = jnp.asarray(work.tokenize(subject.prompts(cfg.token)))
    latents = encode_subject(work, subject.images)
    text_params, unet_params = float32(work.params["text_encoder"]), float32(work.params["unet"])
    text_model = CLIPTextModel(work.text_config)
    diffusion = latent_loss_fn(work)

    def loss(vector, frozen, z0, caption_ids, key):
        text, unet = frozen
        context = text_model.apply({"params": table_with(text, token_id, vector)}, caption_ids,
                                   clip_skip=work.clip_skip).last_hidden_state
        return diffusion(unet, z0, context, key)

    rng = np.random.default_rng([cfg.seed, 3])

    def batch(step):
        i = rng.integers(len(latents), size=cfg.batch)
        return latents[i], ids[i]

    vector, history = fit(loss, jnp.asarray(table[init[0]]), optax.adam(cfg.lr), batch, cfg.steps, cfg.seed,
                          progress, desc=f"textual inversion {cfg.token}", checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, frozen=(text_params, unet_params))
    history["config"] = asdict(cfg)
    return np.asarray(vector, np.float32), history
