"""A DALL-E-style transformer: caption tokens, then the image's codebook indices, one causal sequence.

    position    0 ... Lt-1                        |  Lt ... Lt+N-1        (Ramesh et al. 2021; N = G x G codes)
    token       caption words, then pads          |  codebook indices in raster order
    embedding   word (or its own pad_i) + pos_i   |  code + row_r + column_c

Two vocabularies, two embedding tables, two output heads; the output at p predicts token p+1, and
:func:`loss_fn` weighs text 1/8, image 7/8.  Every image token sees the whole caption; among image
tokens each layer uses one pattern of :data:`PATTERNS` (Child et al. 2019): "row" (the previous G
positions), "column" (the same column above), "conv" (a (2k+1) x (2k+1) neighbourhood above and to
the left), "causal".  :func:`sample` writes one image token a step (with the key-value cache, one
token through the network), with guidance on the logits l = l_u + s (l_c - l_u).  Lesson 6.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import attention

PATTERNS = ("row", "column", "conv", "causal")


@dataclass(frozen=True)
class DalleConfig:
    """Sizes of a DALL-E-style transformer.  ``attention`` names each layer's pattern (cycled)."""

    text_vocab: int = 24
    text_len: int = 10
    num_codes: int = 512
    grid: int = 8
    width: int = 192
    layers: int = 6
    heads: int = 6
    mlp_ratio: int = 4
    attention: tuple = ("row", "column")
    conv_radius: int = 1
    dropout: float = 0.0

    def __post_init__(self):
        bad = [p for p in self.attention if p not in PATTERNS]
        if bad or not self.attention:
            raise ValueError(f"unknown attention pattern(s) {bad}; choose from {', '.join(PATTERNS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        object.__setattr__(self, "attention", tuple(self.attention))

    @classmethod
    def paper(cls) -> "DalleConfig":
        """DALL-E at its published size (Ramesh et al. 2021, sec. 2 and appendix B.1): 256 BPE text
        positions over a 16,384-token vocabulary, a 32 x 32 grid of 8,192 dVAE codes, 64 layers of
        62 heads of 64 (d_model 3,968), about 12 billion parameters.  Image attention: a column mask
        in layers i (1-based) with (i - 2) mod 4 = 0, a row mask in the others, and a convolutional
        mask in the last layer (i = 64).  (The conv neighbourhood here is ``conv_radius``'s.)"""
        attention = tuple("conv" if i == 64 else "column" if (i - 2) % 4 == 0 else "row" for i in range(1, 65))
        return cls(text_vocab=16384, text_len=256, num_codes=8192, grid=32, width=62 * 64, layers=64, heads=62,
                   attention=attention)

    @property
    def image_len(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    def layer_pattern(self, i: int) -> str:
        return self.attention[i % len(self.attention)]


def attention_mask(pattern: str, text_len: int, grid: int, conv_radius: int = 1) -> np.ndarray:
    """bool (L, L), L = text_len + grid^2: mask[i, j] = position i may attend to position j."""
    L = text_len + grid * grid
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    causal = j <= i
    a, b = i - text_len, j - text_len  # image indices (negative: a text position)
    if pattern == "causal":
        image = np.ones((L, L), bool)
    elif pattern == "row":
        image = a - b < grid
    elif pattern == "column":
        image = (a - b) % grid == 0
    elif pattern == "conv":
        image = (np.abs(a // grid - b // grid) <= conv_radius) & (np.abs(a % grid - b % grid) <= conv_radius)
    else:
        raise ValueError(f"unknown attention pattern {pattern!r}; choose from {', '.join(PATTERNS)}")
    return causal & ((b < 0) | image)  # text keys: always (causally) visible


def layer_masks(config: DalleConfig) -> np.ndarray:
    """bool (layers, L, L): each layer's mask."""
    return np.stack([attention_mask(config.layer_pattern(k), config.text_len, config.grid, config.conv_radius)
                     for k in range(config.layers)])


class SelfAttention(nn.Module):
    """Masked multi-head self-attention, on a whole sequence or one position with a key-value cache."""

    heads: int

    @nn.compact
    def __call__(self, x, mask, cache=None, pos=None):
        """x (B, L, D), mask (L, L) bool.  With ``cache`` = (k, v) each (B, Lmax, H, d) and a scalar ``pos``:
        x is (B, 1, D), the new key and value are written at ``pos``, mask is the (Lmax,) row of ``pos``."""
        B, L, D = x.shape
        H = self.heads
        q, k, v = jnp.split(nn.Dense(3 * D, name="qkv")(x).reshape(B, L, 3 * H, D // H), 3, axis=2)  # (B, L, heads, d)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k, (0, pos, 0, 0))  # (B, Lmax, heads, d)
            v = jax.lax.dynamic_update_slice(cache[1], v, (0, pos, 0, 0))
            cache = (k, v)
        out = attention(q, k, v, mask).reshape(B, L, D)  # (B, L, heads, d) -> (B, L, D)
        return nn.Dense(D, name="out")(out), cache


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN x), then x + MLP(LN x)."""

    heads: int
    mlp_ratio: int = 4
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, cache=None, pos=None, train: bool = False):
        h, cache = SelfAttention(self.heads, name="attn")(nn.LayerNorm(name="norm1")(x), mask, cache, pos)
        x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
        h = nn.Dense(self.mlp_ratio * x.shape[-1], name="fc1")(nn.LayerNorm(name="norm2")(x))
        h = nn.Dense(x.shape[-1], name="fc2")(nn.gelu(h))
        return x + nn.Dropout(self.dropout)(h, deterministic=not train), cache


class DalleTransformer(nn.Module):
    """``apply(params, tokens)`` -> (text_logits, image_logits) for a whole (B, L) sequence;
    ``apply(params, token, pos, cache, method="step")`` for one position with the cache."""

    config: DalleConfig

    def setup(self):
        c = self.config
        self.word = nn.Embed(c.text_vocab + c.text_len, c.width, name="text_embed")  # + one pad per slot
        self.text_pos = nn.Embed(c.text_len, c.width, name="text_pos")
        self.code = nn.Embed(c.num_codes, c.width, name="image_embed")
        self.row = nn.Embed(c.grid, c.width, name="row_embed")
        self.col = nn.Embed(c.grid, c.width, name="col_embed")
        self.blocks = [Block(c.heads, c.mlp_ratio, c.dropout, name=f"layers_{k}") for k in range(c.layers)]
        self.norm = nn.LayerNorm(name="norm")
        self.text_head = nn.Dense(c.text_vocab, name="text_head")
        self.image_head = nn.Dense(c.num_codes, name="image_head")
        self.masks = layer_masks(c)

    def embed(self, tokens, positions):
        """tokens (B, L) at sequence positions (L,): text embedding before text_len, image after."""
        c = self.config
        t = jnp.clip(positions, 0, c.text_len - 1)
        word = jnp.where(tokens == 0, c.text_vocab + t, jnp.clip(tokens, 0, c.text_vocab - 1))  # pad_i
        text = self.word(word) + self.text_pos(t)
        a = jnp.clip(positions - c.text_len, 0, c.image_len - 1)
        image = self.code(jnp.clip(tokens, 0, c.num_codes - 1)) + self.row(a // c.grid) + self.col(a % c.grid)
        return jnp.where((positions < c.text_len)[:, None], text, image)

    def heads(self, x):
        x = self.norm(x)
        return self.text_head(x), self.image_head(x)

    def __call__(self, tokens, train: bool = False):
        L = tokens.shape[1]
        x = self.embed(tokens, jnp.arange(L))
        for block, mask in zip(self.blocks, self.masks):
            x, _ = block(x, mask[:L, :L], train=train)
        return self.heads(x)

    def step(self, token, pos, cache):
        """One position: token (B,) at scalar ``pos``; cache = list of (k, v) per layer, each (B, L, H, d)."""
        x = self.embed(token[:, None], pos[None])
        new = []
        for block, mask, kv in zip(self.blocks, self.masks, cache):
            x, kv = block(x, jnp.asarray(mask)[pos][None, :], kv, pos)
            new.append(kv)
        text, image = self.heads(x)
        return text[:, 0], image[:, 0], new


def empty_cache(config: DalleConfig, batch: int, dtype=jnp.float32):
    shape = (batch, config.seq_len, config.heads, config.width // config.heads)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers)]


def loss_fn(model: DalleTransformer, params, tokens, image_weight: float = 7 / 8, train: bool = False, rngs=None):
    """Weighted next-token cross-entropy: (1 - w) * text + w * image (DALL-E: w = 7/8)."""
    c = model.config
    text_logits, image_logits = model.apply({"params": params}, tokens, train=train, rngs=rngs)
    Lt = c.text_len
    # position p predicts token p+1: text from positions 0..Lt-2, image from Lt-1..L-2
    text_nll = -jnp.take_along_axis(jax.nn.log_softmax(text_logits[:, : Lt - 1]), tokens[:, 1:Lt, None], -1)
    image_nll = -jnp.take_along_axis(jax.nn.log_softmax(image_logits[:, Lt - 1 : -1]), tokens[:, Lt:, None], -1)
    text_loss, image_loss = text_nll.mean(), image_nll.mean()
    return (1 - image_weight) * text_loss + image_weight * image_loss, {"text": text_loss, "image": image_loss}


def filter_logits(logits, temperature: float = 1.0, top_k: int | None = None):
    """Divide by the temperature; keep only the ``top_k`` largest logits (the rest -inf)."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return logits


def sample(model: DalleTransformer, params, text_tokens, key, temperature: float = 1.0, top_k: int | None = None,
           guidance_scale: float = 1.0, use_cache: bool = True, guided: bool | None = None):
    """Image tokens (B, G*G) for captions ``text_tokens`` (B, Lt), one token per step.

    With ``guidance_scale`` s != 1 the batch is run twice, with the caption and with an empty one
    (all pads); the next token is drawn from l_u + s (l_c - l_u).  Everything random comes from
    ``key``: token p uses ``fold_in(key, p)``, so the cached and uncached loops draw the same tokens.
    Under ``jax.jit`` with a traced ``guidance_scale``, say ``guided=True`` (run both branches).
    """
    c = model.config
    B = text_tokens.shape[0]
    guided = guidance_scale != 1.0 if guided is None else guided
    text = jnp.concatenate([text_tokens, jnp.zeros_like(text_tokens)]) if guided else jnp.asarray(text_tokens)
    seq = jnp.zeros((text.shape[0], c.seq_len), jnp.int32).at[:, : c.text_len].set(text)

    def next_token(image_logits, p):
        if guided:
            cond, uncond = jnp.split(image_logits, 2)
            image_logits = uncond + guidance_scale * (cond - uncond)
        logits = filter_logits(image_logits, temperature, top_k)
        tok = jax.random.categorical(jax.random.fold_in(key, p), logits).astype(jnp.int32)
        return jnp.concatenate([tok, tok]) if guided else tok

    def body(p, carry):
        seq, cache = carry
        if use_cache:
            _, image_logits, cache = model.apply({"params": params}, seq[:, p], p, cache, method="step")
        else:
            image_logits = model.apply({"params": params}, seq)[1][:, p]
        tok = next_token(image_logits, p)
        # the output at p predicts token p+1; text slots are given, not sampled
        seq = jnp.where(p + 1 >= c.text_len, jax.lax.dynamic_update_slice(seq, tok[:, None], (0, p + 1)), seq)
        return seq, cache

    cache = empty_cache(c, seq.shape[0]) if use_cache else None
    seq, _ = jax.lax.fori_loop(0, c.seq_len - 1, body, (seq, cache))
    return seq[:B, c.text_len :]
