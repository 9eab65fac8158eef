"""CLIP's text transformer: the prompt encoder of Stable Diffusion, in Flax linen.

    ids (B, L <= 77) -> token + position embedding -> N x [x += SelfAttn(LN1(x))  (causal: i sees 0..i),
                        x += fc2(act(fc1(LN2(x))))] -> final_layer_norm -> (B, L, D)
    act = quick_gelu x sigmoid(1.702 x) (OpenAI CLIP, SD 1.x)  or  exact gelu x Phi(x) (OpenCLIP, SD 2.x)

SD 1.x's context is the ``last_hidden_state`` of ViT-L/14, (B, 77, 768); ``clip_skip=k`` runs the
first N - k layers, then final_layer_norm (diffusers: ``final_layer_norm(hidden_states[-(k + 1)])``).
SD 2.x's is the final LayerNorm of the penultimate of OpenCLIP ViT-H/14's 24 layers, (B, 77, 1024):
diffusers stores just those 23 (``CLIPTextConfig.sd2()``, clip_skip 0); a full 24-layer tower needs
``clip_skip=1``.  Names mirror transformers' ``CLIPTextModel`` (``encoder/layers_0/self_attn/q_proj``),
so weights convert by renaming plus transposing (``minidiff.weights``).  With ``projection_dim`` set the
model is transformers' ``CLIPTextModelWithProjection``: text_embeds = text_projection(pooled), a linear
map without bias (SDXL's second encoder, OpenCLIP ViT-bigG/14: ``CLIPTextConfig.sdxl_g()``).  Also: the toy
``ContrastiveCLIP``, and ``add_token_rows`` / ``table_with`` for textual inversion.  Lesson 8.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Conv, attention

Dtype = Any


@dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture of a CLIP text tower (field names as in transformers' CLIPTextConfig)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu" (exact, OpenCLIP)
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # <|endoftext|>; the pooled output is the state at its first occurrence
    projection_dim: int | None = None  # CLIPTextModelWithProjection: text_projection's width (SDXL's bigG: 1280)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} cannot be split into {self.num_attention_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def sd15(cls, **overrides) -> "CLIPTextConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower, 123,060,480 parameters."""
        return replace(cls(), **overrides)

    @classmethod
    def sd2(cls, **overrides) -> "CLIPTextConfig":
        """SD 2.x: OpenCLIP ViT-H/14 text tower as diffusers stores it: 23 of its 24 layers (SD 2.x
        conditions on the penultimate layer), width 1024, 16 heads, exact gelu; 340,387,840 parameters."""
        base = cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu")
        return replace(base, **overrides)

    @classmethod
    def sdxl_l(cls, **overrides) -> "CLIPTextConfig":
        """SDXL's first text encoder: SD 1.x's OpenAI CLIP ViT-L/14 (SDXL takes its penultimate state)."""
        return cls.sd15(**overrides)

    @classmethod
    def sdxl_g(cls, **overrides) -> "CLIPTextConfig":
        """SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower with its projection, width 1280,
        32 layers, 20 heads, exact gelu; 694,659,840 parameters."""
        base = cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)
        return replace(base, **overrides)

    @classmethod
    def toy(cls, **overrides) -> "CLIPTextConfig":
        """A small tower for tests and CPU training (SD's vocabulary and 77 positions, width 64)."""
        base = cls(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
        return replace(base, **overrides)


def quick_gelu(x):
    """x sigmoid(1.702 x): OpenAI's fast approximation of GELU, used by the SD 1.x text encoder."""
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
    pooler_output: jax.Array  # (B, D), last_hidden_state at the first end token
    hidden_states: tuple | None  # embeddings, then the output of every layer run (before final_layer_norm)
    text_embeds: jax.Array | None = None  # (B, projection_dim): text_projection(pooler_output), with a projection


class CLIPAttention(nn.Module):
    """Multi-head self-attention; ``mask`` (B or 1, 1, L, L) bool, True where query i may attend to key j."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        B, L, D = x.shape
        proj = lambda name: nn.Dense(D, dtype=self.dtype, name=name)  # noqa: E731
        q, k, v = (proj(n)(x).reshape(B, L, self.heads, D // self.heads) for n in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, mask).reshape(B, L, D)  # (B, L, heads, d) -> (B, L, D)
        return proj("out_proj")(out)


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(_ACTIVATIONS[self.hidden_act](h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block:  x += SelfAttn(LN1(x), causal);  x += MLP(LN2(x))."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        x = x + CLIPAttention(cfg.num_attention_heads, self.dtype, name="self_attn")(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    """token_embedding[ids] + position_embedding[0..L-1]  (both learned)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[1]))[None]


class CLIPEncoder(nn.Module):
    """The first ``num_layers`` blocks; returns the final state and every intermediate one."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, num_layers: int):
        states = [x]
        for i in range(num_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


def _check_ids(input_ids, cfg: CLIPTextConfig):
    """Shape and range checks, done in Python when the ids are concrete (skipped under jit)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length) token ids, got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"{input_ids.shape[1]} tokens exceed the {cfg.max_position_embeddings} positions of the "
                         "text encoder; truncate the prompt (the tokenizer does, with a warning)")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    try:
        ids = np.asarray(input_ids)
    except jax.errors.TracerArrayConversionError:
        return
    if ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got {ids.min()} .. {ids.max()}")


class CLIPTextModel(nn.Module):
    """CLIP text transformer.  ``model.apply({"params": p}, ids)`` -> ``CLIPTextOutput``.

    input_ids: (B, L) ints, L <= 77.  attention_mask: optional (B, L), 1 for tokens to attend to,
    0 for padding, combined with the causal mask (SD's pipelines pass none: SD 1.x pads with the end
    token and lets the padding attend).  clip_skip: run only the first N - clip_skip layers and apply
    final_layer_norm to their output (0 = all layers; see the module docstring for what SD 1.x and
    SD 2.x use).  output_hidden_states: also return (embeddings, layer 1, ..., layer N - clip_skip),
    as transformers' ``hidden_states`` (without final_layer_norm).  With ``config.projection_dim``
    (``CLIPTextModelWithProjection``) also ``text_embeds`` = pooled @ W_proj (parameter ``text_projection``).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, clip_skip: int = 0, output_hidden_states: bool = False):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        _check_ids(input_ids, cfg)
        if not 0 <= clip_skip < cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must lie in [0, {cfg.num_hidden_layers}), got {clip_skip}")
        B, L = input_ids.shape

        mask = jnp.tril(jnp.ones((L, L), bool))[None, None]  # (1, 1, Lq, Lk): key j <= query i
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(f"attention_mask must have the shape of input_ids {(B, L)}, "
                                 f"got {tuple(attention_mask.shape)}")
            mask = mask & (jnp.asarray(attention_mask) > 0)[:, None, None, :]

        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        # init always builds every layer, so the parameter tree does not depend on clip_skip
        layers = cfg.num_hidden_layers if self.is_initializing() else cfg.num_hidden_layers - clip_skip
        x, states = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask, layers)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)

        # pooled: the state at the first end token (for tokenizer output, where the end token is the
        # largest id, this equals the argmax(ids) rule of the original CLIP and of SD's configs)
        eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = x[jnp.arange(B), eos]
        text_embeds = None
        if cfg.projection_dim is not None:  # CLIPTextModelWithProjection: a linear map, no bias
            text_embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return CLIPTextOutput(x, pooled, states if output_hidden_states else None, text_embeds)


class ToyImageEncoder(nn.Module):
    """CLIP's image tower in miniature, for training a toy text encoder contrastively: a small CNN
    that keeps *where* things are (flatten, no pooling), then a projection to the joint space.

        x (B, H, W, 3) in [-1, 1] ──► conv 3x3 ──► [conv 3x3 stride 2, GELU] x len(features)
          ──► flatten ──► dense, GELU ──► dense (embed_dim)
    """

    features: tuple[int, ...] = (32, 64, 64)
    hidden: int = 256
    embed_dim: int = 64

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(Conv(self.features[0], (3, 3), name="conv_in")(x))
        for i, f in enumerate(self.features):
            h = nn.gelu(Conv(f, (3, 3), strides=(2, 2), name=f"down_{i}")(h))
        h = nn.gelu(nn.Dense(self.hidden, name="hidden")(h.reshape(h.shape[0], -1)))
        return nn.Dense(self.embed_dim, name="proj")(h)


class ContrastiveCLIP(nn.Module):
    """A text tower and an image tower mapped into one space (Radford et al. 2021).

    ``apply(variables, ids, images)`` -> (text embeddings, image embeddings, logit_scale): the text
    embedding is the pooled output (the state at the end token) through ``text_projection``.  After
    training, ``params["text_model"]`` is a plain :class:`CLIPTextModel` tree.
    """

    text_config: CLIPTextConfig
    image_features: tuple[int, ...] = (32, 64, 64)
    embed_dim: int = 64

    def setup(self):
        self.text_model = CLIPTextModel(self.text_config)
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
        self.vision_model = ToyImageEncoder(self.image_features, embed_dim=self.embed_dim)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

    def encode_text(self, ids):
        return self.text_projection(self.text_model(ids).pooler_output)

    def encode_image(self, images):
        return self.vision_model(images)

    def __call__(self, ids, images):
        return self.encode_text(ids), self.encode_image(images), self.logit_scale


# --- new tokens (textual inversion): rows of the token table ------------------------------------------


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


def table_with(text_params, token_id: int, vector):
    """The text encoder's parameters with row ``token_id`` of the token table set to ``vector``:
    the only place the trained vector enters the model (works on traced arrays)."""
    table = text_params["embeddings"]["token_embedding"]["embedding"]
    embeddings = {**text_params["embeddings"], "token_embedding": {"embedding": table.at[token_id].set(vector)}}
    return {**text_params, "embeddings": embeddings}
