"""Atomic writes of result files that other people can read (mode from the umask)."""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.contracts import atomic_write_bytes


def write_shared(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Temporary name in the same folder, optional fsync, rename; mode 0666 & ~umask."""
    atomic_write_bytes(path, data, fsync=fsync)


def write_derived(folder: str, name: str, data: bytes | memoryview) -> None:
    """``folder/name`` replaced atomically (temporary file, rename), no fsync,
    the folder created if missing; mode 0666 & ~umask, applied by the kernel.

    For the many small files a reduce rebuilds: file-system calls cost as much
    as encoding such a file, so this makes four (mkdir, open, write, rename)
    where ``write_shared`` makes about ten. The temporary name is unique per
    process, so two processes never write the same temporary file.
    """
    try:
        os.mkdir(folder)
    except FileExistsError:
        pass
    tmp = f"{folder}/.{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, f"{folder}/{name}")
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
