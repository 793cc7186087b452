"""Atomic writes of result files that other people can read.

``contracts.atomic_write_bytes`` creates files through ``mkstemp``, which gives
them mode 0600: fine for markers, wrong for a summary or a report that a
group shares on a cluster. These files get the mode the user's umask allows.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_shared(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Temporary name in the same folder, optional fsync, rename; mode 0666 & ~umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
