"""Wrappers that adapt the UNet to the toy image data: pixel patches folded into channels, and the
(shape, colour) class read as two context tokens.

    PatchedDenoiser:  x (B, H, W, C) -> (B, H/p, W/p, p^2 C) -> network -> back
    ClassTokens:      class c = shape * n_colours + colour -> context [E_shape[shape], E_colour[colour]] (B, 2, width)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ..data import split_class


def space_to_depth(x, p: int):
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C): every p x p patch of pixels becomes one position."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // p, p, W // p, p, C)                 # (B, h, p, w, p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, H // p, W // p, p * p * C)   # (B, h, w, p*p*C)


def depth_to_space(x, p: int):
    """The inverse of :func:`space_to_depth`."""
    B, h, w, D = x.shape
    C = D // (p * p)
    x = x.reshape(B, h, w, p, p, C)                           # (B, h, w, p, p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, h * p, w * p, C)              # (B, H, W, C)


class PatchedDenoiser(nn.Module):
    """An image denoiser run on p x p patches folded into channels (Hoogeboom et al. 2023,
    "simple diffusion").  Only a rearrangement of pixels, so the diffusion itself is unchanged; the
    network works on p^2 fewer positions, which on a CPU buys p^2 more channels for the same cost."""

    inner: nn.Module
    patch_size: int

    def __call__(self, x, t, class_labels=None, train: bool = False):
        p = self.patch_size
        return depth_to_space(self.inner(space_to_depth(x, p), t, class_labels=class_labels, train=train), p)


class ClassTokens(nn.Module):
    """A class-conditional UNet that reads its (shape, colour) class as two words, by cross-attention
    at every resolution (as the mini SD reads its caption).  The "no class" label (c = n_shapes *
    n_colours) reads its own row in both tables: the classifier-free guidance "empty caption"."""

    inner: nn.Module  # a UNet2DCondition with cross_attention_dim = width
    n_shapes: int
    n_colors: int
    width: int

    @nn.compact
    def __call__(self, x, t, class_labels=None, train: bool = False):
        null = class_labels == self.n_shapes * self.n_colors
        shape, colour = split_class(class_labels, self.n_colors)
        shape, colour = jnp.where(null, self.n_shapes, shape), jnp.where(null, self.n_colors, colour)
        context = jnp.stack([nn.Embed(self.n_shapes + 1, self.width, name="shape_tokens")(shape),
                             nn.Embed(self.n_colors + 1, self.width, name="color_tokens")(colour)], axis=1)
        return self.inner(x, t, context, train=train)                     # context (B, 2, width)
