"""VQ-VAE (van den Oord et al. 2017): a conv encoder, the nearest-code bottleneck, a conv decoder.

    x (B, H, W, 3) ─encoder─► z (B, H/f, W/f, D) ─quantizer─► indices (B, H/f, W/f), z_q ─decoder─► x_hat

f = 2^(len(channels) - 1).  Loss = ||x - x_hat||^2 + codebook loss + commitment loss (see
``minidiff.nn.quantizer``).  ``quantizer="gumbel"`` makes it DALL-E's dVAE instead: the encoder gives
K logits per position, training decodes a Gumbel-softmax sample (``tau``), the loss adds the KL to a
uniform prior; evaluation decodes the argmax code.  The image becomes a grid of integers: the DALL-E-style transformer
(``minidiff.nn.dalle``) writes such grids token by token, and :meth:`VQVAE.decode_indices` turns
them back into pictures.

    model = VQVAE(VQVAEConfig())
    variables = model.init(key, x)                      # params (+ "vq_ema" in EMA mode)
    x_hat, indices, aux = model.apply(variables, x)
    x_again = model.apply(variables, indices, method=VQVAE.decode_indices)
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax.numpy as jnp

from .layers import Downsample, ResnetBlock, Upsample, conv3x3
from .quantizer import GumbelQuantizer, VectorQuantizer


@dataclass(frozen=True)
class VQVAEConfig:
    """Channels per resolution (the first at full size; each next one half the size)."""

    channels: tuple = (64, 128, 128)
    num_res_blocks: int = 1
    latent_dim: int = 32  # D: the codebook vectors' length
    num_codes: int = 512  # K
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.99
    groups: int = 32
    quantizer: str = "nearest"  # "nearest": VQ-VAE (straight-through); "gumbel": DALL-E's dVAE
    kl_weight: float = 0.01  # gumbel: weight of KL(q || uniform) per position (nats)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.quantizer not in ("nearest", "gumbel"):
            raise ValueError(f"quantizer must be 'nearest' or 'gumbel', got {self.quantizer!r}")
        bad = [c for c in self.channels if c % self.groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by the {self.groups} GroupNorm groups")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class Encoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = conv3x3(c.channels[0], "conv_in", jnp.float32)(x)
        for level, ch in enumerate(c.channels):
            for r in range(c.num_res_blocks):
                h = ResnetBlock(ch, c.groups, name=f"down_{level}_res_{r}")(h, None)
            if level < len(c.channels) - 1:
                h = Downsample(ch, name=f"down_{level}_downsample")(h)
        h = ResnetBlock(c.channels[-1], c.groups, name="mid_res")(h, None)
        h = nn.silu(nn.GroupNorm(c.groups, name="norm_out")(h))
        return nn.Conv(c.num_codes if c.quantizer == "gumbel" else c.latent_dim, (1, 1), name="conv_out")(h)


class Decoder(nn.Module):
    config: VQVAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        h = conv3x3(c.channels[-1], "conv_in", jnp.float32)(z)
        h = ResnetBlock(c.channels[-1], c.groups, name="mid_res")(h, None)
        for level in reversed(range(len(c.channels))):
            for r in range(c.num_res_blocks):
                h = ResnetBlock(c.channels[level], c.groups, name=f"up_{level}_res_{r}")(h, None)
            if level > 0:
                h = Upsample(c.channels[level - 1], name=f"up_{level}_upsample")(h)
        h = nn.silu(nn.GroupNorm(c.groups, name="norm_out")(h))
        return conv3x3(3, "conv_out", jnp.float32)(h)


class VQVAE(nn.Module):
    config: VQVAEConfig

    def setup(self):
        c = self.config
        self.encoder = Encoder(c)
        if c.quantizer == "gumbel":
            self.quantizer = GumbelQuantizer(c.num_codes, c.latent_dim, c.kl_weight)
        else:
            self.quantizer = VectorQuantizer(c.num_codes, c.latent_dim, c.beta, c.ema, c.decay)
        self.decoder = Decoder(c)

    def __call__(self, x, update: bool = False, tau=None):
        """x (B, H, W, 3) in [-1, 1] -> (x_hat, indices (B, h, w), aux losses of the quantizer).
        ``update``: move the EMA codebook (nearest); ``tau``: decode a Gumbel-softmax sample at this
        temperature (gumbel; needs ``rngs={"gumbel": key}``), else the argmax code."""
        z = self.encoder(x)
        if self.config.quantizer == "gumbel":
            z_q, indices, aux = self.quantizer(z, tau)
        else:
            z_q, indices, aux = self.quantizer(z, update)
        return self.decoder(z_q), indices, aux

    def encode(self, x):
        """x -> (the encoder's output: z before quantization, or the logits of the dVAE; indices)."""
        z = self.encoder(x)
        return z, self.quantizer(z)[1]

    def decode_indices(self, indices):
        """Integer grid (B, h, w) -> images (B, H, W, 3) in [-1, 1] (unclipped)."""
        return self.decoder(self.quantizer.lookup(indices))

    def codebook(self):
        return self.quantizer.get_codebook()


def psnr(x, y, peak: float = 2.0):
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2): 10 log10(peak^2 / MSE)."""
    mse = jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2, axis=(-3, -2, -1))
    return 10 * jnp.log10(peak**2 / mse)
