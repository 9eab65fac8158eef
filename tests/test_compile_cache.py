"""The persistent compilation cache: a second run with the same shapes reads its programs back."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, time
import minidiff.compile_cache as cc
cc.enable(sys.argv[1])                       # before JAX is imported: through JAX's environment variables
import jax
assert jax.config.jax_compilation_cache_dir == sys.argv[1], jax.config.jax_compilation_cache_dir
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
from minidiff.cli import main
t0 = time.perf_counter()
rc = main(["txt2img", "a red circle", "-o", sys.argv[2], "--steps", "2", *sys.argv[3:]])
print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - t0,
                      hits=events.count("/jax/compilation_cache/cache_hits"),
                      misses=events.count("/jax/compilation_cache/cache_misses"))))  # = entries written
"""


def _run(cache, out, *extra):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(out), *extra], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_second_run_reads_the_compiled_programs_back(tmp_path):
    cache = tmp_path / "cache"
    first = _run(cache, tmp_path / "a.png", "--compile-cache", str(cache))
    assert first["rc"] == 0 and first["misses"] >= 3 and first["hits"] == 0, first
    kept = sorted(p.name.split("-")[0] for p in cache.glob("*-cache"))
    assert {"jit__encode_text", "jit__denoise", "jit__decode"} <= set(kept), kept  # the sampler's step too
    second = _run(cache, tmp_path / "b.png", "--compile-cache", str(cache))
    # every program kept is read back.  JAX counts a "miss" only when it writes an entry: programs that
    # compiled in under 0.2 s were not kept and compile again, and on a loaded machine one of them can take
    # longer the second time and be written then -- a new entry, never a rewrite of a kept one.
    assert second["rc"] == 0 and second["hits"] >= len(kept), (first, second, kept)
    assert len(list(cache.glob("*-cache"))) == len(kept) + second["misses"], (first, second, kept)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # the same program, the same bits
    off = _run(cache, tmp_path / "c.png", "--no-compile-cache")
    assert off["rc"] == 0 and off["hits"] == 0, off
    print(f"first run {first['seconds']:.1f} s, second {second['seconds']:.1f} s, without the cache "
          f"{off['seconds']:.1f} s")


def test_an_unwritable_cache_folder_is_a_warning_not_a_failure(tmp_path, capsys):
    from minidiff.cli import use_compile_cache

    blocker = tmp_path / "file"
    blocker.write_text("")

    class Args:
        compile_cache = str(blocker / "cache")  # under a file: cannot be made
        no_compile_cache = False

    with pytest.warns(UserWarning, match="compiled programs will not be kept"):
        use_compile_cache(Args)


def test_the_default_folder_follows_the_environment(monkeypatch, tmp_path):
    from minidiff import compile_cache

    monkeypatch.delenv("MINIDIFF_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "minidiff" / "jax"
    monkeypatch.setenv("MINIDIFF_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.default_dir() == tmp_path / "mine"


def test_entries_written_without_a_size_limit_do_not_block_later_writes(tmp_path):
    """An entry from a run without JAX's size limit has no access-time file; JAX's eviction reads one for
    every entry, so without enable()'s repair every later write failed (a warning, nothing kept)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "jit_old-0123-cache").write_bytes(b"compiled elsewhere")
    script = (f"import minidiff.compile_cache as cc, os; cc.enable({str(cache)!r}); "
              "os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'; import jax, jax.numpy as jnp; "
              "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(3)).block_until_ready()")
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    written = {p.name for p in cache.glob("*-cache")} - {"jit_old-0123-cache"}
    assert written and all((cache / (n[:-len("-cache")] + "-atime")).is_file() for n in written), sorted(cache.iterdir())
