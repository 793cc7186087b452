"""The reducer's file I/O for the many small files it reads and rebuilds.

Summaries, caches and reports are written through ``contracts.atomic_write_bytes``.
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


def read_with_stat(path: str) -> tuple[bytes, os.stat_result]:
    """The whole file and its stat, taken from the open file before reading:
    one open and a few syscalls, where ``open().read()`` plus ``os.stat``
    costs twice as many and Python's file objects on top.

    The first read asks for one byte more than fstat's size: a shorter answer
    is the end of the file (a regular file is read in full up to its end), so
    the usual file costs one read; only a file that grew since fstat is read
    on to its end.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        want = st.st_size + 1
        data = os.read(fd, want)
        if len(data) < want:
            return data, st
        parts = [data]
        while True:
            chunk = os.read(fd, max(want, 1 << 16))
            if not chunk:
                return b"".join(parts), st
            parts.append(chunk)
    finally:
        os.close(fd)
