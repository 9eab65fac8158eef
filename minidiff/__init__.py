"""minidiff: image generation from scratch.

``minidiff.diffusion`` is the mathematics in pure NumPy; the JAX/Flax networks live in
``minidiff.nn``.  Importing ``minidiff`` imports neither JAX nor torch; it sets the one XLA CPU
flag that minidiff runs faster with (``minidiff.xla_cpu``).
"""

from minidiff import xla_cpu as _xla_cpu

_xla_cpu.apply_defaults()

__version__ = "0.1.0"
