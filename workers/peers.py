"""The ranks of a cell notice when one of them is gone.

A rank that dies (SIGKILL from the out-of-memory killer, a lost node) leaves
the others waiting: in the join until its timeout, or in an NCCL collective
until NCCL's (10 minutes by default), holding the allocation and their caps.
Slurm stops them only where the site sets KillOnBadExit (the local launcher's
runner does it itself, submit/gang.py).

So every rank of a cell of several ranks beats: it rewrites
``launch/alive-<job>.a<attempt>/rank-<r>`` with a counter every ``beat_s``.
Rank 0 reads every other rank's file and the others read rank 0's: a few file
operations per beat on a shared file system, whatever the rank count. A rank
whose counter has not moved for ``timeout_s`` (``WATTSWEEP_PEER_TIMEOUT_S``,
default 120 s; judged by the reader's own clock, so other nodes' clocks do not
matter) is gone. Every rank also looks for this attempt's FAILED.json written
by another rank: that is how the rest of a cell hears of a rank that rank 0
found gone, or of one that failed with an exception while the others wait in
NCCL. Either way ``stop(verdict)`` is called once (the gone peer and why, or
None when another rank's FAILED.json already says why); the worker then writes FAILED.json and
stops its own rank with SIGTERM, whose handler (or the stop watcher) restores
the cap. A rank that ends writes ``done`` and is never judged gone; one that
ends with an error writes ``failed`` and is judged gone at once. A reader
that itself did not look for a while (the job suspended, a node paused)
restarts its clocks rather than blame the peers for its own silence.

Each beat opens, writes and closes the file, and each read opens it afresh:
NFS makes a file's new bytes visible to other nodes on close and revalidates
on open. The counter is fixed-width and written in place, so a reader never
sees an empty file.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

DEFAULT_TIMEOUT_S = 120.0
_WIDTH = 20
DONE = "done".ljust(_WIDTH)
FAILED = "failed".ljust(_WIDTH)


def timeout_s() -> float:
    """``WATTSWEEP_PEER_TIMEOUT_S``; 0 turns the watch off."""
    try:
        value = float(os.environ.get("WATTSWEEP_PEER_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S
    return 0.0 if value <= 0 else max(1.0, value)


class PeerWatch:
    """Beat for ``rank`` in ``folder`` and watch the peers of a ``world``-rank cell."""

    def __init__(self, folder: Path, rank: int, world: int, *, stop: Callable[[tuple[int, str] | None], None],
                 other_failed: Callable[[], bool], timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.rank, self.world = Path(folder), rank, world
        self.timeout_s = timeout if timeout is not None else timeout_s()
        self.beat_s = min(5.0, self.timeout_s / 4)
        self._stop_cell, self._other_failed, self._clock = stop, other_failed, clock
        peers = range(1, world) if rank == 0 else [0]
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (last content, when it last changed)
        self._watching = [p for p in peers if p != rank]
        self._count = 0
        self._last_check: float | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeerWatch":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._beat()
        self._thread = threading.Thread(target=self._run, name="wattsweep-peer-watch", daemon=True)
        self._thread.start()
        return self

    def finish(self, ok: bool = True) -> None:
        """This rank ends: stop watching and say so. ``done`` is never taken
        for gone; ``failed`` (the rank ended with an error) is, at once, so the
        others stop even if this rank could not write FAILED.json."""
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.beat_s + 1.0)  # no beat lands after the last word
        self._write(DONE if ok else FAILED)

    def _run(self) -> None:
        while not self._halt.wait(self.beat_s):
            try:
                self._beat()
                verdict = self.check()
            except Exception as exc:  # noqa: BLE001 - a flaky file system must not end the watch (and the beats)
                print(f"wattsweep worker: peer watch: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                continue
            if verdict is not False and not self._halt.is_set():
                self._halt.set()
                self._stop_cell(verdict)
                return

    def check(self) -> tuple[int, str] | None | bool:
        """False while all is well; (peer, reason) when a peer is gone; None when
        another rank's FAILED.json already says why."""
        if self._other_failed():
            return None
        now = self._clock()
        if self._last_check is not None and now - self._last_check > 2 * self.beat_s:
            # This rank did not look for a while (the job suspended, a node or VM
            # paused, a file system stalled): the peers did not beat either, so
            # the silence is not theirs. Only time spent watching counts.
            self._seen = {p: (text, now) for p, (text, _) in self._seen.items()}
        self._last_check = now
        for peer in list(self._watching):
            text = self._read(peer)
            if text is None:
                continue  # not started yet (or unreadable for now): the join's own timeout covers it
            if text == DONE:
                self._watching.remove(peer)
                continue
            if text == FAILED:
                return peer, (f"rank {peer} ended with an error (its log says why; `wattsweep logs SWEEP_DIR CELL "
                              f"--rank {peer}`); rank {self.rank} stopped the cell")
            last = self._seen.get(peer)
            if last is None or last[0] != text:
                self._seen[peer] = (text, now)
            elif now - last[1] > self.timeout_s:
                return peer, (f"rank {peer} stopped answering: its heartbeat has not moved for {self.timeout_s:g} s "
                              f"(killed, out of memory, or its node lost? its log says how far it got); "
                              f"rank {self.rank} stopped the cell")
        return False

    def _beat(self) -> None:
        self._count += 1
        self._write(str(self._count).rjust(_WIDTH))

    def _path(self, rank: int) -> str:
        return str(self.folder / f"rank-{rank}")

    def _write(self, text: str) -> None:
        try:
            fd = os.open(self._path(self.rank), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, text.encode(), 0)
            finally:
                os.close(fd)
        except OSError:
            pass  # a full or flaky file system: peers see a pause, and judge only after timeout_s

    def _read(self, rank: int) -> str | None:
        try:
            with open(self._path(rank), "rb") as f:
                data = f.read(_WIDTH)
        except OSError:
            return None
        return data.decode(errors="replace") if len(data) == _WIDTH else None
