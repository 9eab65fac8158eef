"""VQGAN's patch discriminator (Esser et al. 2021, after pix2pix's PatchGAN, Isola et al. 2017).

    x (B, H, W, 3) ─[conv 4x4 stride 2, leaky ReLU] x len(channels)─► conv 3x3 ─► logits (B, H/2^n, W/2^n)

One real-or-reconstructed logit per patch (each sees a window of about 10 x 10 pixels for two
layers), not one per picture: it judges local texture and edges, which is what a pixel-wise loss
blurs.  ``minidiff.train.vqvae`` trains it against the VQ-VAE's decoder with the hinge loss.
"""

from __future__ import annotations

import flax.linen as nn

from .layers import Conv


class PatchDiscriminator(nn.Module):
    channels: tuple = (32, 64)

    @nn.compact
    def __call__(self, x):
        h = x
        for i, c in enumerate(self.channels):
            h = nn.leaky_relu(Conv(c, (4, 4), strides=(2, 2), name=f"down_{i}")(h), 0.2)
        return Conv(1, (3, 3), name="logits")(h)[..., 0]
