"""The building blocks of Stable Diffusion's UNet, in Flax linen.

Layout: images and feature maps are NHWC (batch, height, width, channels); token sequences are
(batch, length, features).  Sub-module names mirror the diffusers checkpoint layout
(``resnets_0/conv1``, ``transformer_blocks_0/attn1/to_q``, ``ff/net_0/proj``...) so that loading
public weights is renaming plus transposing (see ``minidiff.weights``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def conv3x3(features: int, name: str, dtype: Dtype, stride: int = 1) -> nn.Conv:
    """3x3 convolution with symmetric padding 1 (PyTorch's padding=1, also for stride 2)."""
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


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


def dot_product_attention(q, k, v, chunk_size: int | None = None):
    """softmax(q k^T / sqrt(d)) v for q (B, Lq, H, d), k and v (B, Lk, H, d).

    The (Lq x Lk) weight matrix is the memory hog: at SD's 64x64 latents it has 4096^2 entries per
    head.  With ``chunk_size`` the queries are processed ``chunk_size`` at a time (``lax.map``), so
    only a (chunk_size x Lk) block exists at once; the result is the same.  The softmax is
    normalised after multiplying by v (divide Lq x d numbers, not Lq x Lk):

        out = (exp(s - max s) v) / sum exp(s - max s),     s = q k^T / sqrt(d)
    """
    B, Lq, H, d = q.shape
    q = (q * d**-0.5).transpose(0, 2, 1, 3)  # heads first: (B, H, L, d), plain batched matmuls
    k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)  # k as (B, H, d, Lk)

    def attend(q_block):
        s = jnp.matmul(q_block, k, preferred_element_type=jnp.float32)
        p = jnp.exp(s - s.max(axis=-1, keepdims=True))
        out = jnp.matmul(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (out / p.sum(axis=-1, keepdims=True)).astype(v.dtype)

    if chunk_size is None or Lq <= chunk_size or Lq % chunk_size:
        out = attend(q)
    else:
        blocks = q.reshape(B, H, Lq // chunk_size, chunk_size, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(attend, blocks).transpose(1, 2, 0, 3, 4).reshape(B, H, Lq, d)
    return out.transpose(0, 2, 1, 3)


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
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.head_dim)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        out = dot_product_attention(q, k, v, self.chunk_size)
        out = out.reshape(out.shape[0], out.shape[1], inner)
        if self.is_mutable_collection("intermediates"):  # asked for (lessons): the weights, (B, H, Lq, Lk)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
            self.sow("intermediates", "attention_probs", jax.nn.softmax(s, axis=-1))
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
