"""Files that are never half-written: every write goes to a temporary file in the same folder, is
flushed, and is renamed over the target (``os.replace`` is atomic on one file system), so a reader
sees the old file or the whole new one.

    atomic_write(path, data)   data: bytes, or a function that writes a given temporary path
    remove_stale_temps(path)   temporary files of ``path`` left by a killed process (SIGKILL)
    check_writable(folder)     a clear error now rather than after the work

Temporary names are ``.NAME.PID.tmp``: a later run removes those whose process is gone.  Files get
the permissions the umask gives (``tempfile`` would make them 0600).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Delete ``.NAME.PID.tmp`` files next to ``path`` whose process no longer runs; return them."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.tmp$")
    removed = []
    if path.parent.is_dir():
        for f in path.parent.iterdir():
            m = pattern.match(f.name)
            if m and not _alive(int(m.group(1))):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def atomic_write(path, data: bytes | Callable[[Path], None], *, replace: bool = True) -> Path:
    """Write ``path`` all at once.  ``data``: bytes, or ``write(tmp_path)`` that writes the file.
    With ``replace=False`` the finished temporary file is returned, not yet renamed (to rename
    several files one after the other: :func:`commit`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if not replace:
            return tmp
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C, SIGTERM (as KeyboardInterrupt), a full disk: leave nothing behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the real error matters more
        raise
    return path


def commit(tmp: Path, path) -> Path:
    """Rename a finished temporary file (from ``atomic_write(..., replace=False)``) over ``path``."""
    os.replace(tmp, path)
    return Path(path)


def check_writable(folder, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` (e.g. "-o out/x.png") unless a file can be created in
    ``folder`` (or in the nearest existing folder above it, where the rest will be created)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is a file, not a folder")
    probe = folder / f".minidiff-probe.{os.getpid()}.tmp"
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {folder} ({e.strerror or e})") from None
    probe.unlink(missing_ok=True)
