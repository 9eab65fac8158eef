"""Compiled programs reused across runs: JAX's persistent compilation cache in a user folder.

The first ``minidiff txt2img`` at a size compiles its programs (text encoder, the sampler's scan, the
VAE decoder: 20-40 s at Stable Diffusion size); each is written to the cache folder, keyed by the
program, the shapes, the JAX version and the device, and the next run with the same shapes reads it
back instead of compiling.  The folder: ``--compile-cache DIR``, else ``$MINIDIFF_CACHE_DIR``, else
``$XDG_CACHE_HOME/minidiff/jax`` (``~/.cache/minidiff/jax``); ``--no-compile-cache`` turns it off.
A compiled program runs native code: keep the folder your own (JAX's own warning).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "MINIDIFF_CACHE_DIR"
MIN_COMPILE_SECONDS = 0.2  # programs that compile faster than this are not worth a file
MAX_BYTES = 4 << 30  # least recently used entries go beyond this


def default_dir() -> Path:
    """$MINIDIFF_CACHE_DIR, else $XDG_CACHE_HOME/minidiff/jax, else ~/.cache/minidiff/jax."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minidiff" / "jax"


def enable(path=None) -> Path:
    """Compile into and load from ``path`` (default: :func:`default_dir`).  Before JAX is imported this
    only sets JAX's environment variables (no import); after, it updates JAX's config."""
    path = Path(path).expanduser() if path is not None else default_dir()
    path.mkdir(parents=True, exist_ok=True)
    _give_every_entry_an_access_time(path)
    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_SECONDS,
                "jax_persistent_cache_min_entry_size_bytes": -1,  # no size floor
                "jax_compilation_cache_max_size": MAX_BYTES}
    if "jax" not in sys.modules:
        for name, value in settings.items():
            os.environ[name.upper()] = str(value)
        return path
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # read the new folder from the next compilation on
    return path


def _give_every_entry_an_access_time(path: Path) -> None:
    """JAX's size limit evicts by the ``<key>-atime`` file beside each ``<key>-cache``; an entry written
    without a limit (plain ``JAX_COMPILATION_CACHE_DIR``) has none, and then every later write into the
    folder fails with FileNotFoundError.  Such entries get the oldest time: they go first."""
    for entry in path.glob("*-cache"):
        atime = entry.with_name(entry.name[: -len("-cache")] + "-atime")
        if not atime.exists():
            try:
                atime.write_bytes((0).to_bytes(8, "little"))
            except OSError:
                return


def disable() -> None:
    """Compile every program afresh (the cache folder is left as it is)."""
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_enable_compilation_cache", False)
