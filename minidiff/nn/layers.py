"""The building blocks of Stable Diffusion's UNet, in Flax linen, and the one attention function of
``minidiff.nn`` (UNet, VAE, CLIP, DALL-E):  attention(q, k, v, mask) = softmax(q k^T / sqrt(d) + mask) v.

Layout: images and feature maps are NHWC (batch, height, width, channels); token sequences are
(batch, length, features).  Sub-module names mirror the diffusers checkpoint layout
(``resnets_0/conv1``, ``transformer_blocks_0/attn1/to_q``, ``ff/net_0/proj``...) so that loading
public weights is renaming plus transposing (see ``minidiff.weights``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def timestep_embedding(t, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0):
    """Sinusoidal embedding of the timestep, as SD computes it (Transformer positional encoding):

        omega_i = max_period^(-i / (half - freq_shift)),  i = 0 .. half-1,   half = dim // 2
        emb     = [cos(t omega), sin(t omega)]     (flip_sin_to_cos=True, SD;  [sin, cos] otherwise)

    t: (B,) timesteps (int or float).  Returns (B, dim) float32.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        emb = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(emb)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(emb))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated``, except that an NHWC input smaller than the HWIO kernel (a 3x3
    convolution over SD's 2x2 latents of a 128x128 image) is one product of its patches with the
    kernel (im2col):  y[n, i, j] = concat_(a, b) x_pad[n, s i + a, s j + b] @ W.reshape(kh kw C_in, C_out).

    The same numbers; but XLA rewrites such a convolution with its operands swapped (the input as the
    window), which its CPU backend runs ~30x slower: 315 ms against 10 for (2, 2, 2, 1280) -> 1280."""
    pads = _patch_padding(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count)
    if pads is None:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kw)
    (kh, kw_), (sh, sw) = rhs.shape[:2], window_strides
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    Ho, Wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw_) // sw + 1
    patches = jnp.concatenate([x[:, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw]
                               for a in range(kh) for b in range(kw_)], axis=-1)     # (N, Ho, Wo, kh kw C_in)
    return lax.dot_general(patches, rhs.reshape(-1, rhs.shape[-1]), (((3,), (0,)), ((), ())), precision=precision)


def _patch_padding(lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups):
    """The (H, W) padding pairs when ``conv_general_dilated`` takes patches: a plain NHWC/HWIO convolution
    (no dilation, one group, no cropping) whose input is smaller than its kernel but has an output;
    None otherwise (XLA's convolution)."""
    if lhs.ndim != 4 or groups != 1 or any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ())):
        return None
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != \
            lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")):
        return None
    size, kernel = lhs.shape[1:3], rhs.shape[:2]
    pads = lax.padtype_to_pads(size, kernel, strides, padding) if isinstance(padding, str) else padding
    smaller = any(n < k for n, k in zip(size, kernel))
    has_output = all(lo >= 0 and hi >= 0 and n + lo + hi >= k for n, k, (lo, hi) in zip(size, kernel, pads))
    return tuple(map(tuple, pads)) if smaller and has_output else None


def Conv(features: int, kernel_size, **kw) -> nn.Conv:
    """``nn.Conv`` (the same parameters) computed by ``conv_general_dilated`` above."""
    return nn.Conv(features, kernel_size, conv_general_dilated=conv_general_dilated, **kw)


def conv3x3(features: int, name: str, dtype: Dtype, stride: int = 1) -> nn.Conv:
    """3x3 convolution with symmetric padding 1 (PyTorch's padding=1, also for stride 2)."""
    return Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """h = conv1(SiLU(GroupNorm(x))) + proj(SiLU(temb));  h = conv2(dropout(SiLU(GroupNorm(h))));
    return shortcut(x) + h, with a 1x1 conv shortcut when the channel count changes."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, train: bool = False):
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm1")(x))
        h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (padding 1 on every side)."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv3x3(self.channels, "conv", self.dtype, stride=2)(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.channels, "conv", self.dtype)(x)


def attention_scores(q, k, mask=None):
    """s = q k^T / sqrt(d) in float32, masked entries set to finfo(float32).min: q (B, Lq, heads, d),
    k (B, Lk, heads, d) -> (B, heads, Lq, Lk).  softmax(s) are the attention weights."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    # where(), not + -inf: a row with every key masked would give exp(-inf - -inf) = NaN.  The finite
    # minimum gives it uniform weights (finite output, as in transformers); elsewhere exp(min - max s) = 0.
    return s if mask is None else jnp.where(mask, s, jnp.finfo(jnp.float32).min)


# Which kernel computes attention: "reference" (below: the CPU's, and the definition the others are
# tested against), "xla" (jax.nn.dot_product_attention's XLA graph), "cudnn" (cuDNN's fused flash
# attention, NVIDIA GPUs, float16 / bfloat16), or "auto": cuDNN where it applies, else XLA's on
# accelerators, the reference on CPU.  Read when a network is traced: $MINIDIFF_ATTENTION, or set it.
ATTENTION = os.environ.get("MINIDIFF_ATTENTION", "auto")
IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn")


def attention_implementation(q, mask=None) -> str:
    """The kernel ``attention`` uses for queries q (B, Lq, heads, d) on the default backend."""
    if ATTENTION not in IMPLEMENTATIONS:
        raise ValueError(f"MINIDIFF_ATTENTION={ATTENTION!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if ATTENTION != "auto":
        return ATTENTION
    backend = jax.default_backend()
    if backend == "cpu":
        return "reference"
    d = q.shape[-1]
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    return "cudnn" if backend in ("gpu", "cuda") and half and mask is None and d % 8 == 0 and d <= 128 else "xla"


def attention(q, k, v, mask=None, chunk_size: int | None = None):
    """Multi-head scaled dot-product attention, the one kernel of every network in ``minidiff.nn``:

        out = softmax(q k^T / sqrt(d) + mask) v,    mask = 0 where allowed, -infinity elsewhere

    q (B, Lq, heads, d), k and v (B, Lk, heads, d) -> (B, Lq, heads, d) in v's dtype.  ``mask``: bool,
    broadcastable to (B, heads, Lq, Lk), True where query i may attend to key j (see attention_scores).
    The reference kernel: logits, softmax and sums in float32 whatever the input dtype; the weights
    meet v in v's dtype (float32 accumulation) and are normalised after it: out = (exp(s - max s) v) /
    sum exp(s - max s).  On accelerators ``jax.nn.dot_product_attention`` (see ``ATTENTION``).
    ``chunk_size``: queries per block (``lax.map``), so that (chunk_size x Lk) weights exist at a time,
    not all Lq x Lk (4096^2 per head at SD's 64x64 latents); each row's numbers are unchanged.  Many
    keys and no mask (self-attention over pixels) take the online softmax over key blocks instead,
    which never holds more than (Lq x block) weights of one head and takes every query at once, as
    cuDNN's flash attention does.
    """
    B, Lq, H, d = q.shape
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # (B or 1, heads or 1, Lq or 1, Lk)
    kernel = attention_implementation(q, mask)

    block = _key_block(k.shape[1]) if mask is None and kernel == "reference" else None

    def attend(q, mask):  # q (B, c, heads, d) -> (B, c, heads, d)
        if block:
            return online_softmax_attention(q, k, v, block)
        if kernel != "reference":
            m = None if mask is None else jnp.broadcast_to(mask, (B, H, q.shape[1], k.shape[1]))
            return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=m,
                                                implementation=kernel).astype(v.dtype)
        s = attention_scores(q, k, mask)                                      # (B, heads, c, Lk)
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))                        # unnormalised weights
        out = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / p.sum(-1, keepdims=True)).transpose(0, 2, 1, 3).astype(v.dtype)  # (B, c, heads, d)

    if chunk_size is None or Lq <= chunk_size or kernel == "cudnn" or block:  # block: (Lq x block) at a time
        return attend(q, mask)
    n, pad = -(-Lq // chunk_size), -Lq % chunk_size  # n blocks, the last one padded with zero queries
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))                        # (B, n c, heads, d)
    q = q.reshape(B, n, chunk_size, H, d).swapaxes(0, 1)                      # (n, B, c, heads, d)
    if mask is not None and mask.shape[2] > 1:  # a mask row per query: cut into the same blocks
        rows = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)))              # (., ., n c, Lk)
        rows = jnp.moveaxis(rows.reshape(*rows.shape[:2], n, chunk_size, -1), 2, 0)  # (n, ., ., c, Lk)
        out = jax.lax.map(lambda qm: attend(*qm), (q, rows))                  # (n, B, c, heads, d)
    else:
        out = jax.lax.map(lambda qb: attend(qb, mask), q)                     # (n, B, c, heads, d)
    return out.swapaxes(0, 1).reshape(B, n * chunk_size, H, d)[:, :Lq]       # (B, Lq, heads, d)


KEY_BLOCK = 256  # keys per block of the online softmax: a (queries x 256) tile of weights at a time


def _key_block(Lk: int) -> int | None:
    """The key block for Lk keys: KEY_BLOCK's largest divisor that also divides Lk (>= 64), or None
    (few keys, e.g. the 77 text tokens of cross-attention: one block is all of them)."""
    b = math.gcd(Lk, KEY_BLOCK)
    return b if Lk > 2 * KEY_BLOCK and b >= 64 else None


def online_softmax_attention(q, k, v, block: int):
    """softmax(q k^T / sqrt(d)) v one block of keys at a time, never holding all the weights
    (Milakov & Gimelshein 2018; the loop of FlashAttention, Dao et al. 2022).  With the running
    maximum m, sum l and output o of the blocks seen so far, block j's logits s_j update

        m' = max(m, max s_j),   l' = l e^(m - m') + sum e^(s_j - m'),   o' = o e^(m - m') + e^(s_j - m') v_j

    and out = o / l.  Exactly the softmax (up to rounding), and about 2x faster than one pass over all
    4096 keys on this CPU (benchmarks/attention.py, 2026-12-03: 0.53 s against 1.03; torch's fused
    kernel 0.35).  What makes it fast is fewer passes over the weights, each over a tile that stays in
    the cache: one head at a time (``lax.map``), so a block's weights are (queries x block), 4 MiB at
    4096 x 256, a core's L2, not (batch x heads) times that; 1/sqrt(d) scales q, not s; l comes out of
    the same product as o, as the last column of e^(s_j - m') [v_j, 1]; and the row maximum is a tree
    of elementwise maxima (XLA's CPU reduce-max over the last axis is 6x slower than one elementwise
    pass).
    q (B, c, heads, d); k, v (B, n * block, heads, d), block a power of two; float32 logits and sums,
    as in ``attention``."""
    B, c, H, d = q.shape
    n = k.shape[1] // block
    qh = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3).reshape(B * H, c, d)
    v1 = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)   # [v, 1]: (B, Lk, heads, d + 1)
    kb = k.transpose(0, 2, 1, 3).reshape(B * H, n, block, d)                   # (B heads, n, block, d)
    vb = v1.transpose(0, 2, 1, 3).reshape(B * H, n, block, d + 1)              # (B heads, n, block, d + 1)

    def one_head(qkv):  # (c, d), (n, block, d), (n, block, d + 1) -> (c, d + 1) = [o, l]
        qi, ki, vi = qkv

        def step(carry, kv):
            m, o = carry
            s = jnp.einsum("qd,kd->qk", qi, kv[0], preferred_element_type=jnp.float32)  # (c, block)
            m_new = jnp.maximum(m, _row_max(s))
            p = jnp.exp(s - m_new).astype(v.dtype)
            return (m_new, o * jnp.exp(m - m_new) + jnp.einsum("qk,kd->qd", p, kv[1],
                                                               preferred_element_type=jnp.float32)), None

        (_, o), _ = jax.lax.scan(step, (jnp.full((c, 1), -jnp.inf), jnp.zeros((c, d + 1))), (ki, vi))
        return o

    o = jax.lax.map(one_head, (qh, kb, vb)).reshape(B, H, c, d + 1)          # one head at a time
    return (o[..., :d] / o[..., d:]).transpose(0, 2, 1, 3).astype(v.dtype)    # (B, c, heads, d)


def _row_max(s):
    """max over the last axis (a power of two long) as log2(n) elementwise maxima of halves, which XLA
    fuses into one pass; NaN propagates as in ``max``.  s (..., n) -> (..., 1)."""
    while s.shape[-1] > 1:
        half = s.shape[-1] // 2
        s = jnp.maximum(s[..., :half], s[..., half:])
    return s


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention whose
    keys and values come from the context (the text tokens)."""

    heads: int
    head_dim: int
    chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.head_dim
        context = x if context is None else context
        q = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        q, k, v = (a.reshape(*a.shape[:2], self.heads, self.head_dim) for a in (q, k, v))  # (B, L, heads, d)
        out = attention(q, k, v, chunk_size=self.chunk_size).reshape(*x.shape[:2], inner)  # (B, Lq, heads * d)
        if self.is_mutable_collection("intermediates"):  # asked for (lessons): the weights, (B, heads, Lq, Lk)
            self.sow("intermediates", "attention_probs", jax.nn.softmax(attention_scores(q, k), axis=-1))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """proj(x) = [a, g];  return a * GELU(g)  (Shazeer 2020), GELU exact."""

    dim_out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        a, g = jnp.split(nn.Dense(2 * self.dim_out, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return a * nn.gelu(g, approximate=False)


class FeedForward(nn.Module):
    """GEGLU to 4x the width, then back (diffusers: ff.net.0 = GEGLU, ff.net.2 = Linear)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """x += SelfAttn(LN(x));  x += CrossAttn(LN(x), context) (when there is a context);  x += FF(LN(x))."""

    heads: int
    head_dim: int
    cross_attention: bool = True
    chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        attn = lambda name: Attention(self.heads, self.head_dim, self.chunk_size, self.dtype, name=name)  # noqa: E731
        x = x + attn("attn1")(nn.LayerNorm(epsilon=1e-5, name="norm1")(x))
        if self.cross_attention:
            x = x + attn("attn2")(nn.LayerNorm(epsilon=1e-5, name="norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(nn.LayerNorm(epsilon=1e-5, name="norm3")(x))


class Transformer2D(nn.Module):
    """Attention over the pixels of a feature map:
    GroupNorm -> proj_in (1x1 conv in SD 1.x, linear in SD 2.x) -> transformer blocks -> proj_out,
    plus the input (residual)."""

    heads: int
    head_dim: int
    num_layers: int = 1
    cross_attention: bool = True
    use_linear_projection: bool = False
    groups: int = 32
    chunk_size: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        B, H, W, C = x.shape
        inner = self.heads * self.head_dim
        h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(B, H * W, C))
        else:
            h = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(B, H * W, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.cross_attention, self.chunk_size, self.dtype,
                                      name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(C, dtype=self.dtype, name="proj_out")(h).reshape(B, H, W, C)
        else:
            h = nn.Conv(C, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(B, H, W, inner))
        return h + x
