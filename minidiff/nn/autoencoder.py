"""AutoencoderKL: Stable Diffusion's VAE (Rombach et al. 2022, "KL-f8"), in Flax linen.

    encode  x (B, H, W, 3) in [-1, 1] -> encoder -> quant_conv -> [mean, logvar] (B, H/f, W/f, 2*4)
            = q(z | x) = N(mean, exp(logvar))                                  (DiagonalGaussian)
    decode  z (B, H/f, W/f, 4) -> post_quant_conv -> decoder -> x_hat (B, H, W, 3)
    latents_from_images(x) = z * scaling_factor;   images_from_latents(l) = decode(l / scaling_factor)

Encoder: down blocks of ResnetBlocks (no time embedding, GroupNorm eps 1e-6) with a stride-2 conv
after all but the last, then a mid block (ResnetBlock, single-head self-attention, ResnetBlock);
the decoder mirrors it with nearest 2x upsampling.  SD: block_out_channels (128, 256, 512, 512), so
f = 8, scaling_factor 0.18215, applied only in the two helpers (``encode`` / ``decode``: unscaled z).
Names mirror diffusers', so :func:`minidiff.weights.vae_from_torch` renames and transposes.  Lesson 7.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from .layers import Conv, ResnetBlock, Upsample, attention, conv3x3


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Everything that fixes the architecture, plus the latent ``scaling_factor``.

    The defaults are Stable Diffusion's VAE (1.x and 2.x share it): 83,653,863 parameters."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    sample_size: int = 512
    scaling_factor: float = 0.18215
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    attention_chunk_size: int | None = 1024  # queries per block in the mid-block attention, up to 512
    # pixels (more, a multiple of 64, take blocks of keys instead: layers._key_block)

    def __post_init__(self):
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"{c} channels cannot be split into {self.norm_num_groups} GroupNorm groups")

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.sample_size // self.downsample_factor

    @classmethod
    def sd(cls, **overrides) -> "AutoencoderKLConfig":
        """Stable Diffusion 1.x / 2.x's VAE: 512x512x3 <-> 64x64x4, scaling factor 0.18215."""
        return replace(cls(), **overrides)

    @classmethod
    def toy(cls, sample_size: int = 32, **overrides) -> "AutoencoderKLConfig":
        """SD's block structure at small widths, f = 2 (32x32 images -> 16x16x4 latents).  A trained
        toy VAE should set its own ``scaling_factor`` (1 / std of its latents)."""
        base = cls(sample_size=sample_size, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   attention_chunk_size=None)
        return replace(base, **overrides)


@struct.dataclass
class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))).  A pytree (it can leave ``jax.jit``).

    Build it with :meth:`from_moments`, which clips logvar to [-30, 20] as SD does."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> "DiagonalGaussian":
        """moments (..., 2C) = [mean, logvar] along the last (channel) axis."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)  # sigma = exp(logvar / 2)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """z = mean + sigma * eps,  eps ~ N(0, I)  (the reparameterisation trick)."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None):
        """KL(q || other) summed over (H, W, C), per batch element; ``other`` defaults to N(0, I):

            KL = 1/2 sum( mu^2 + sigma^2 - 1 - log sigma^2 )
        """
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                             - self.logvar + other.logvar, axis=axes)

    def nll(self, z):
        """-log q(z) summed over (H, W, C):  1/2 sum( log 2 pi + logvar + (z - mu)^2 / sigma^2 )."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + (z - self.mean) ** 2 / self.var, axis=axes)


# --- building blocks ------------------------------------------------------------------------------


def _resnet(cfg: AutoencoderKLConfig, channels: int, dtype, name: str) -> ResnetBlock:
    return ResnetBlock(channels, cfg.norm_num_groups, cfg.norm_eps, 0.0, dtype, name=name)


class EncoderDownsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv after padding ONE row/column at the bottom/right.

    Not the UNet's ``Downsample`` (padding 1 on every side): SD's VAE uses padding (0, 1), i.e.
    diffusers' ``Downsample2D(padding=0)`` which pads F.pad(x, (0, 1, 0, 1)) before the conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return Conv(self.channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype, name="conv")(x)


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H*W pixels, with GroupNorm in front and a residual:

        h = GroupNorm(x) as (B, HW, C);   q, k, v = h W_q, h W_k, h W_v   (with biases)
        out = x + to_out( softmax(q k^T / sqrt(C)) v )

    (diffusers: ``Attention(heads=1, dim_head=C, residual_connection=True)``; ldm: ``AttnBlock``
    with 1x1 convs q, k, v, proj_out.)"""

    groups: int
    eps: float
    chunk_size: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = nn.GroupNorm(self.groups, epsilon=self.eps, name="group_norm")(x).reshape(B, H * W, 1, C)  # one head
        q, k, v = (nn.Dense(C, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))  # (B, HW, 1, C)
        out = attention(q, k, v, chunk_size=self.chunk_size).reshape(B, H * W, C)
        return x + nn.Dense(C, dtype=self.dtype, name="to_out_0")(out).reshape(B, H, W, C)


class DownEncoderBlock(nn.Module):
    """``layers_per_block`` ResnetBlocks, then (except in the last block) an EncoderDownsample."""

    config: AutoencoderKLConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        cfg, i = self.config, self.index
        ch = cfg.block_out_channels[i]
        for j in range(cfg.layers_per_block):
            h = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(h, None)
        if i < len(cfg.block_out_channels) - 1:
            h = EncoderDownsample(ch, self.dtype, name="downsamplers_0")(h)
        return h


class UpDecoderBlock(nn.Module):
    """``layers_per_block + 1`` ResnetBlocks (one more than the encoder; no skips, unlike the UNet),
    then (except in the last block) nearest-neighbour 2x upsampling and a 3x3 conv."""

    config: AutoencoderKLConfig
    index: int  # up block i works at the width of encoder block n - 1 - i
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        ch = cfg.block_out_channels[n - 1 - i]
        for j in range(cfg.layers_per_block + 1):
            h = _resnet(cfg, ch, self.dtype, f"resnets_{j}")(h, None)
        if i < n - 1:
            h = Upsample(ch, self.dtype, name="upsamplers_0")(h)
        return h


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        ch = cfg.block_out_channels[-1]
        h = _resnet(cfg, ch, self.dtype, "resnets_0")(h, None)
        if cfg.mid_block_attention:
            h = SpatialSelfAttention(cfg.norm_num_groups, cfg.norm_eps, cfg.attention_chunk_size, self.dtype,
                                     name="attentions_0")(h)
        return _resnet(cfg, ch, self.dtype, "resnets_1")(h, None)


class Encoder(nn.Module):
    """x (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), before quant_conv."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        h = conv3x3(cfg.block_out_channels[0], "conv_in", dt)(x)
        for i in range(len(cfg.block_out_channels)):
            h = DownEncoderBlock(cfg, i, dt, name=f"down_blocks_{i}")(h)
        h = MidBlock(cfg, dt, name="mid_block")(h)
        h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
        return conv3x3(2 * cfg.latent_channels, "conv_out", dt)(h)


class Decoder(nn.Module):
    """z (B, h, w, latent_channels), after post_quant_conv -> (B, f h, f w, out_channels)."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        h = conv3x3(cfg.block_out_channels[-1], "conv_in", dt)(z)
        h = MidBlock(cfg, dt, name="mid_block")(h)
        for i in range(len(cfg.block_out_channels)):
            h = UpDecoderBlock(cfg, i, dt, name=f"up_blocks_{i}")(h)
        h = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out")(h))
        return conv3x3(cfg.out_channels, "conv_out", dt)(h)


# --- the autoencoder ------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """SD's VAE.  ``encode`` / ``decode`` work in the unscaled latent z; ``latents_from_images`` /
    ``images_from_latents`` in the diffusion model's latents z * scaling_factor.  NHWC, float32 out."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32  # computation dtype; parameters stay float32

    def setup(self):
        cfg, dt = self.config, self.dtype
        self.encoder = Encoder(cfg, dt)
        self.decoder = Decoder(cfg, dt)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=dt)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=dt)

    def encode(self, x) -> DiagonalGaussian:
        """x (B, H, W, in_channels) in [-1, 1] -> the posterior q(z | x) over z (B, H/f, W/f, latent_channels)."""
        self._check(x, self.config.in_channels, "images", self.config.downsample_factor)
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z):
        """z (B, h, w, latent_channels), unscaled -> images (B, f h, f w, out_channels), roughly in [-1, 1]."""
        self._check(z, self.config.latent_channels, "latents z", 1)
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def latents_from_images(self, x, key=None):
        """The diffusion model's latents: z * scaling_factor, with z = a sample of q(z | x) when a
        ``key`` is given, else its mean (the mode)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return z * self.config.scaling_factor

    def images_from_latents(self, latents):
        """Inverse of :meth:`latents_from_images`: decode(latents / scaling_factor)."""
        return self.decode(latents / self.config.scaling_factor)

    def __call__(self, x, key=None):
        """Reconstruct: x -> (decode(z), posterior), z sampled with ``key`` or the posterior mean."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior

    @staticmethod
    def _check(a, channels, what, multiple):
        if a.ndim != 4 or a.shape[-1] != channels:
            raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {a.shape}")
        if a.shape[1] % multiple or a.shape[2] % multiple:
            raise ValueError(f"{what}: height and width must be multiples of {multiple}, got {a.shape[1:3]}")
