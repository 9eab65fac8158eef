"""A small noise predictor for points in R^d (2-D toy data): an MLP with residual blocks.

    t ──sinusoidal──► linear_1, SiLU, linear_2 ──► temb  (+ class embedding)
    x ──► proj_in ──► [h + W2 SiLU(W1 SiLU(LN(h)) + A temb)] x num_blocks ──► LN, SiLU, proj_out ──► eps or v

The network does not know what it predicts: trained against eps it predicts eps, trained against
v = sqrt(ab) eps - sqrt(1 - ab) x0 it predicts v (see ``minidiff.train.diffusion``).  Its call
signature matches :class:`~minidiff.nn.unet.UNet2DCondition` (``class_labels``, ``train``), so
the training loop and the sampler treat both the same way.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .layers import TimestepEmbedding, timestep_embedding


class ResidualMLPBlock(nn.Module):
    """h + W2 SiLU(W1 SiLU(LayerNorm(h)) + A temb): the time embedding shifts the hidden units."""

    features: int

    @nn.compact
    def __call__(self, h, temb):
        u = nn.Dense(self.features, name="linear_1")(nn.silu(nn.LayerNorm(name="norm")(h)))
        u = u + nn.Dense(self.features, name="time_emb_proj")(nn.silu(temb))
        # the last layer starts at zero, so every block starts as the identity
        return h + nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="linear_2")(nn.silu(u))


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t[, y]) for x_t of shape (B, d).

    ``num_class_embeds``: the number of class embeddings (as in ``UNetConfig``); None for an
    unconditional model.  Reserve one extra index for "no class" if you train with label dropout
    (classifier-free guidance).
    """

    hidden: int = 128
    num_blocks: int = 4
    time_embed_dim: int = 64  # width of the sinusoidal embedding before its MLP
    num_class_embeds: int | None = None

    @nn.compact
    def __call__(self, x, t, class_labels=None, train: bool = False):
        if x.ndim != 2:
            raise ValueError(f"MLPDenoiser takes points of shape (B, d), got {x.shape}")
        if (self.num_class_embeds is None) != (class_labels is None):
            raise ValueError("class_labels must be given exactly when the model has num_class_embeds "
                             f"(num_class_embeds={self.num_class_embeds})")
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = TimestepEmbedding(self.hidden, name="time_embedding")(timestep_embedding(t, self.time_embed_dim))
        if self.num_class_embeds is not None:
            temb = temb + nn.Embed(self.num_class_embeds, self.hidden, name="class_embedding")(class_labels)
        h = nn.Dense(self.hidden, name="proj_in")(x)
        for i in range(self.num_blocks):
            h = ResidualMLPBlock(self.hidden, name=f"blocks_{i}")(h, temb)
        h = nn.silu(nn.LayerNorm(name="norm_out")(h))
        return nn.Dense(x.shape[-1], name="proj_out")(h)
