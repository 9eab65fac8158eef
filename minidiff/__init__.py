"""minidiff: image generation from scratch.

``minidiff.diffusion`` is the mathematics in pure NumPy; the JAX/Flax networks live in
``minidiff.nn``.  Importing ``minidiff`` imports neither JAX nor torch.
"""

__version__ = "0.1.0"
