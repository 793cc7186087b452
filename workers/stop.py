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
import time
from typing import Callable

WATCHED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
DEFAULT_GRACE_S = 10.0

# action(signum, notes): may append a sentence to notes for the actions after it.
StopAction = Callable[[int, list], None]


def grace_s() -> float:
    try:
        value = float(os.environ.get("WATTSWEEP_STUCK_GRACE_S", DEFAULT_GRACE_S))
    except ValueError:
        return DEFAULT_GRACE_S
    return min(3600.0, max(0.1, value)) if value == value else DEFAULT_GRACE_S


# A handler run this long before the watcher read the byte still counts as
# taking it: the main thread may get to a signal before the watcher thread does.
_EARLY_S = 0.5


def announces(handler: Callable) -> Callable:
    """Mark a handler that calls handled() first (functions only; a method is
    marked on its function): only such handlers may take a watched signal."""
    getattr(handler, "__func__", handler)._wattsweep_announces = True  # type: ignore[union-attr]
    return handler


def _announcing(handler: Callable) -> Callable:
    """``handler`` behind a wrapper that calls handled() first (submitit's USR2
    requeue, installed before the watcher)."""
    def wrapper(signum: int, frame: object) -> object:
        handled()
        return handler(signum, frame)

    wrapper._wattsweep_announces = True  # type: ignore[attr-defined]
    wrapper.__wrapped__ = handler  # type: ignore[attr-defined]
    return wrapper


def _announces(handler: object) -> bool:
    return bool(getattr(getattr(handler, "__func__", handler), "_wattsweep_announces", False))


class _Watcher:
    def __init__(self, grace: float) -> None:
        self.grace_s = grace
        self._handled = threading.Event()
        self._handled_at = -1e18  # monotonic time of the last handler run
        self._actions: list[tuple[int, StopAction]] = []
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
        for sig in WATCHED_SIGNALS:  # handlers already there announce too (they were installed first)
            current = signal.getsignal(sig)
            if callable(current) and not _announces(current):
                signal.signal(sig, _announcing(current))
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
        self._handled_at = time.monotonic()
        self._handled.set()

    def _run(self) -> None:
        while True:
            try:
                data = self._reader.recv(64)
            except OSError:
                return
            if not data:
                return
            read_at = time.monotonic()
            for signum in data:
                # Only a signal one of our (or wrapped) handlers would take: any
                # other handler never calls handled().
                if signum in WATCHED_SIGNALS and _announces(signal.getsignal(signum)):
                    if not self._taken_since(read_at - _EARLY_S):
                        self._stop(signum)
                    self._drain()  # taken: signals that came with it were taken with it
                    break

    def _taken_since(self, since: float) -> bool:
        """Whether a handler runs from ``since`` on, waiting up to the grace."""
        deadline = time.monotonic() + self.grace_s
        while True:
            self._handled.clear()
            if self._handled_at >= since:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._handled.wait(left)

    def _drain(self) -> None:
        """Bytes already written: signals Python folds into the handler run just seen."""
        self._reader.setblocking(False)
        try:
            while self._reader.recv(64):
                pass
        except OSError:
            pass
        finally:
            self._reader.setblocking(True)

    def _stop(self, signum: int) -> None:
        try:
            name = signal.Signals(signum).name
            _say(f"{name} not taken by the main thread within {self.grace_s:g} s (blocked in a join or collective, "
                 f"waiting on another rank?); stopping from the watcher thread")
            notes: list[str] = []
            with self._lock:
                actions = [a for _, a in reversed(self._actions)]
            for action in actions:
                try:
                    action(signum, notes)
                except BaseException as exc:  # noqa: BLE001 - the next action and the exit must still happen
                    _say(f"stop action failed: {type(exc).__name__}: {exc}")
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - a full or closed log must not keep the process alive
                    pass
        finally:
            os._exit(128 + signum)


def _say(text: str) -> None:
    """One line on stderr, straight to fd 2: a full log file system must not stop the stop."""
    try:
        os.write(2, f"wattsweep worker: {text}\n".encode())
    except OSError:
        pass


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


def innermost_function(stack: str) -> str:
    """The innermost frame's function of a formatted stack ("barrier", "all_gather")."""
    lines = [ln for ln in stack.splitlines() if ln.strip().startswith("File ")]
    return lines[-1].rsplit(" in ", 1)[-1].strip() if lines else "?"


def _forget_in_child() -> None:
    # A forked child (a data-loader worker) must not write its signals into the
    # parent's watcher: the parent would take them for its own and stop itself.
    global _WATCHER
    if _WATCHER is not None:
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        for sock in (_WATCHER._reader, _WATCHER._writer):
            sock.close()
        _WATCHER = None


os.register_at_fork(after_in_child=_forget_in_child)
