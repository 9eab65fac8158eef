"""The JAX/Flax networks (Flax linen; NHWC images, (B, L, D) token sequences):

- ``layers``: the one attention function softmax(q k^T / sqrt(d) + mask) v, and the UNet's blocks
  (timestep embedding, ResnetBlock, Down/Upsample, Attention, GEGLU, Transformer2D);
- ``unet``: UNet2DCondition, the noise predictor eps_theta(x_t, t, context) of SD 1.x / 2.x and the toys;
- ``autoencoder``: AutoencoderKL, SD's VAE between images and latents (and DiagonalGaussian);
- ``clip``: CLIP's text transformer (the prompt encoder) and a toy contrastive CLIP;
- ``quantizer``: the VQ-VAE's nearest-code bottleneck with straight-through gradients;
- ``vqvae``: the VQ-VAE, images to grids of codebook indices and back;
- ``dalle``: the DALL-E-style transformer over caption and image tokens, with sparse masks and a KV cache;
- ``denoisers``: wrappers that fit the UNet to the toy images (patches, class as context tokens);
- ``mlp``: the residual-MLP noise predictor for 2-D points;
- ``classifier``: the small CNN that judges generated shapes pictures.
"""
