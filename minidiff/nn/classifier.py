"""A small CNN that reads a shapes picture: which shape, colour, size and position.

Used as a judge of generated samples (does "a red circle in the top left" come out as one?),
the way FID uses an Inception network, but small enough to train on a CPU in a minute.

    x (B, H, W, 3) in [-1, 1]
      ──► conv 3x3, GELU ──► [conv 3x3 stride 2, GELU] x len(features) ──► flatten   (keeps *where*)
      ──► dense, GELU ──► one linear head per attribute ──► {"shape": logits, "color": logits, ...}
"""

from __future__ import annotations

import flax.linen as nn

from .layers import Conv


class ShapesClassifier(nn.Module):
    """One set of logits per attribute.  ``heads``: ((name, number of classes), ...)."""

    heads: tuple[tuple[str, int], ...]
    stem: int = 16                            # channels of the first, full-resolution convolution
    features: tuple[int, ...] = (32, 64, 64)  # channels after each stride-2 convolution
    hidden: int = 128

    @nn.compact
    def __call__(self, x, features: bool = False) -> dict:
        """Logits per attribute; ``features=True``: the convolutions' activations instead (a list, full
        resolution first), the feature space of the VQGAN experiment's perceptual loss."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"ShapesClassifier takes images (B, H, W, 3) in [-1, 1], got shape {x.shape}")
        h = nn.gelu(Conv(self.stem, (3, 3), name="conv_in")(x))
        maps = [h]
        for i, f in enumerate(self.features):
            h = nn.gelu(Conv(f, (3, 3), strides=(2, 2), name=f"down_{i}")(h))  # halve H and W
            maps.append(h)
        if features:
            return maps
        h = nn.gelu(nn.Dense(self.hidden, name="hidden")(h.reshape(h.shape[0], -1)))
        return {name: nn.Dense(n, name=f"head_{name}")(h) for name, n in self.heads}

    @classmethod
    def from_params(cls, params) -> "ShapesClassifier":
        """The architecture that a parameter tree (``variables["params"]``) was made for, read off its shapes."""
        width = lambda name: int(params[name]["bias"].shape[0])  # noqa: E731
        n_down = sum(k.startswith("down_") for k in params)
        heads = tuple((k[len("head_"):], width(k)) for k in params if k.startswith("head_"))
        return cls(heads=heads, stem=width("conv_in"), features=tuple(width(f"down_{i}") for i in range(n_down)),
                   hidden=width("hidden"))

