"""Training loops (optax): diffusion models, and the helpers they share (checkpoints)."""
