"""XLA's CPU backend as minidiff runs it: the one setting that differs from JAX's default, and why.

From jaxlib 0.9 on, XLA hands float32 (and bfloat16) matrix products and convolutions on the CPU to
YNNPACK.  On this project's 2-core Xeon (AVX-512) those kernels ran slower than XLA's older Eigen ones
at every shape of Stable Diffusion's UNet (``python benchmarks/cpu_kernels.py``, one run): 3x3
convolutions at 16x16x1280 94 -> 172 GFLOP/s (torch 138), dense layers 101-111 -> 138-214 GFLOP/s; and
the whole SD 1.5 UNet step at 64x64 latents 16.4 -> 12.3 s (``benchmarks/unet_step.py --xla-default``).
So, unless you choose otherwise, importing ``minidiff`` adds

    --xla_cpu_experimental_ynn_fusion_type=      (an empty list: no YNNPACK kernels)

to ``$XLA_FLAGS``.  It must happen before JAX starts its CPU backend (the first array or compile);
minidiff's command line, lessons and benchmarks import ``minidiff`` first.  Your choice wins: any
``ynn_fusion_type`` already in ``$XLA_FLAGS`` is left as it is, and ``MINIDIFF_XLA_DEFAULTS=0``
turns this off.  The numbers are the same programs' (float32 rounding may differ in the last bits).
"""

from __future__ import annotations

import os
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type="
FIRST_JAXLIB = (0, 9)  # the first jaxlib with YNNPACK (older ones abort on a flag they do not know)


def _jaxlib_version() -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return (0,)


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except (ImportError, AttributeError):
        return True  # cannot tell: leave XLA_FLAGS alone


def apply_defaults() -> bool:
    """Add ``FLAG`` to ``$XLA_FLAGS`` where it applies (see the module's text); True if it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get("MINIDIFF_XLA_DEFAULTS", "1") == "0" or "ynn_fusion_type" in flags
            or _backend_started() or _jaxlib_version() < FIRST_JAXLIB):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    return True
