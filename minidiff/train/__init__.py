"""Training: one engine, and a loss function and a batch source per model on it.

    engine.py             the loop: jitted step (loss, optax, EMA), checkpoints, exact resume, Ctrl-C
    checkpoint.py         atomic msgpack checkpoints of a run's whole state
    configs.py            every trainer's settings (one dataclass per model; no JAX at import)
    diffusion.py          toy diffusion models (2-D points, 32x32 shapes); diffusion_loss, the one DDPM loss
    classifier.py         the shapes classifier: the judge of generated pictures
    vqvae.py, dalle.py    the VQ-VAE on shapes, the DALL-E-style transformer on its codes
    autoencoder.py        the KL autoencoder (SD's VAE) on crops of photographs
    clip.py               contrastive CLIP on captioned shapes
    mini_sd.py            the built-in mini Stable Diffusion: VAE, CLIP, UNet in three stages
    finetune.py           subjects (pictures + captions), the latent loss, statistics of a subject
    textual_inversion.py  one new word's embedding
    dreambooth.py         the UNet on a subject, with prior preservation
    lora.py               low-rank adapters (LoRA) of the attention projections, on a subject
"""
