"""Atomic writes of result files that other people can read (mode from the umask)."""
from __future__ import annotations

from pathlib import Path

from orchestrator.contracts import atomic_write_bytes


def write_shared(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Temporary name in the same folder, optional fsync, rename; mode 0666 & ~umask."""
    atomic_write_bytes(path, data, fsync=fsync)
