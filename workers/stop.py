"""A stop signal that reaches a rank whose main thread is blocked.

Python runs a signal handler in the main thread, between bytecodes. A rank
blocked in C++ (a gloo or NCCL collective, the rendezvous join) waiting for a
rank that hangs never gets there: SIGTERM from ``scancel``, ``wattsweep
cancel`` or a gang stop is noted and nothing happens until the SIGKILL that
follows, which leaves the rank's power cap set and writes no FAILED.json.

The C part of Python's handler writes the signal's number to the wakeup fd at
once, whatever the main thread is doing. A watcher thread reads it; when no
Python handler has begun within ``grace_s`` (``WATTSWEEP_STUCK_GRACE_S``,
default 10 s: under Slurm's default KillWait of 30 s and the local
launcher's kill wait), it runs the stop actions itself, newest first (the cap
session's restore, then the cell's FAILED.json), and ends the process with
128 + signal. A main thread that does take the signal (``handled``) keeps
the normal path: restore in the handler, unwind, exit.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Callable

WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
DEFAULT_GRACE_S = 10.0

# action(signum, notes): may append a sentence to notes for the actions after it.
StopAction = Callable[[int, list], None]


def grace_s() -> float:
    try:
        return max(0.1, float(os.environ.get("WATTSWEEP_STUCK_GRACE_S", DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


class _Watcher:
    def __init__(self, grace: float) -> None:
        self.grace_s = grace
        self._handled = threading.Event()
        self._actions: list[tuple[int, StopAction]] = []
        self._handlers: list[Callable] = []  # the Python handlers that call handled()
        self._next_token = 0
        self._lock = threading.Lock()
        self._reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd needs it; a full buffer drops bytes, never blocks a handler
        self._writer = writer
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        if old_fd != -1:  # someone else's wakeup fd (an event loop): give it back, do not watch
            signal.set_wakeup_fd(old_fd)
            self._reader.close()
            writer.close()
            raise ValueError("signal wakeup fd already in use")
        self._pid = os.getpid()
        threading.Thread(target=self._run, name="wattsweep-stop-watch", daemon=True).start()

    def push(self, action: StopAction) -> int:
        with self._lock:
            self._next_token += 1
            self._actions.append((self._next_token, action))
            return self._next_token

    def pop(self, token: int) -> None:
        with self._lock:
            self._actions = [(t, a) for t, a in self._actions if t != token]

    def handled(self) -> None:
        self._handled.set()

    def own(self, handler: Callable) -> None:
        with self._lock:
            if not any(handler == h for h in self._handlers):
                self._handlers.append(handler)

    def _run(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in WATCHED_SIGNALS and self._ours(signum):
                    self._judge(signum)

    def _ours(self, signum: int) -> bool:
        """Only a signal that one of our handlers would take: another's
        (submitit's USR2 requeue outside a cap session) never calls handled()."""
        with self._lock:
            handlers = list(self._handlers)
        current = signal.getsignal(signum)
        return any(current == h for h in handlers)

    def _judge(self, signum: int) -> None:
        if self._handled.wait(self.grace_s):
            self._handled.clear()  # the main thread took it: the normal path stops the rank
            return
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        name = signal.Signals(signum).name
        print(f"wattsweep worker: {name} not taken by the main thread within {self.grace_s:g} s (blocked in a "
              f"join or collective, waiting on another rank?); stopping from the watcher thread",
              file=sys.stderr, flush=True)
        notes: list[str] = []
        with self._lock:
            actions = [a for _, a in reversed(self._actions)]
        for action in actions:
            try:
                action(signum, notes)
            except BaseException as exc:  # noqa: BLE001 - the next action and the exit must still happen
                print(f"wattsweep worker: stop action failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)


_WATCHER: _Watcher | None = None


def watch() -> _Watcher | None:
    """Start the watcher (once per process; main thread only, as signal.set_wakeup_fd
    requires). Returns it, or None where it cannot run."""
    global _WATCHER
    if _WATCHER is not None and _WATCHER._pid == os.getpid():
        return _WATCHER
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        _WATCHER = _Watcher(grace_s())
    except (ValueError, OSError):  # another wakeup user we must not displace, or no sockets
        return None
    return _WATCHER


def handled() -> None:
    """Called first thing by the Python handlers of WATCHED_SIGNALS: the main thread is not stuck."""
    if _WATCHER is not None:
        _WATCHER.handled()


def own_handler(handler: Callable) -> None:
    """Declare a Python handler that calls handled() first: only signals that
    such a handler would take are watched."""
    if _WATCHER is not None:
        _WATCHER.own(handler)


def push_action(action: StopAction) -> int | None:
    return _WATCHER.push(action) if _WATCHER is not None else None


def pop_action(token: int | None) -> None:
    if _WATCHER is not None and token is not None:
        _WATCHER.pop(token)


def main_thread_stack() -> str:
    """Where the main thread is blocked, for FAILED.json's traceback."""
    import traceback

    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    return "".join(traceback.format_stack(frame)) if frame is not None else ""


def _forget_in_child() -> None:
    # A forked child (a data-loader worker) must not write its signals into the
    # parent's watcher: the parent would take them for its own and stop itself.
    global _WATCHER
    if _WATCHER is not None:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        _WATCHER = None


os.register_at_fork(after_in_child=_forget_in_child)
