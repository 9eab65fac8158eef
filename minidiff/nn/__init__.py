"""The JAX/Flax networks: layers, the UNet, and the small MLP denoiser for 2-D data."""
