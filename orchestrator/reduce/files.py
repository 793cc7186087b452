"""The reducer's cheap atomic write for the many small files it rebuilds.

Summaries, caches and reports go through ``contracts.atomic_write_bytes``.
"""
from __future__ import annotations

import os


def write_derived(folder: str, name: str, data: bytes | memoryview) -> None:
    """``folder/name`` replaced atomically (temporary file, rename), no fsync,
    the folder created if missing; mode 0666 & ~umask, applied by the kernel.

    For the many small files a reduce rebuilds: file-system calls cost as much
    as encoding such a file, so this makes four (mkdir, open, write, rename)
    where ``contracts.atomic_write_bytes`` makes about ten. The temporary name is unique per
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
