"""The stop watcher (workers/stop.py): acts only on the process's own signals,
and only when the main thread does not take them."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # a Python process per test, and graces to wait out

PRELUDE = textwrap.dedent("""
    import os, signal, sys, time
    os.environ["WATTSWEEP_STUCK_GRACE_S"] = "0.5"
    from workers import stop
    w = stop.watch()
    assert w is not None
    stop.push_action(lambda signum, notes: print("action", signum, flush=True))
""")


def run(body: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=timeout_s)


def test_a_forked_childs_signal_does_not_stop_the_parent():
    """A data-loader worker forked from a rank inherits the wakeup fd; its own
    SIGTERM must not read, in the parent, as a signal the main thread missed."""
    got = run("""
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
            time.sleep(5)
            os._exit(1)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        time.sleep(1.5)  # three graces
        print("parent alive", flush=True)
    """)
    assert got.returncode == 0 and "parent alive" in got.stdout and "action" not in got.stdout, got.stderr


def test_a_signal_the_main_thread_misses_runs_the_actions_and_exits():
    got = run("""
        def handler(*a):
            stop.handled()
            sys.exit(1)
        signal.signal(signal.SIGTERM, stop.announces(handler))
        import ctypes, threading
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        # Blocked in C (glibc's system() waits through EINTR): the handler cannot run until it returns.
        ctypes.CDLL(None).system(b"exec sleep 5 </dev/null >/dev/null 2>&1")  # exec: no shell holds the pipes
        print("not reached", flush=True)
    """)
    assert got.returncode == 128 + signal.SIGTERM
    assert f"action {int(signal.SIGTERM)}" in got.stdout and "not reached" not in got.stdout
    assert "not taken by the main thread within 0.5 s" in got.stderr


def test_a_signal_for_another_handler_is_left_to_it():
    """submitit's USR2 handler (outside a cap session) never says handled():
    the watcher must not take its signal for one the main thread missed."""
    got = run("""
        signal.signal(signal.SIGUSR2, lambda *a: print("theirs", flush=True))
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(1.5)  # three graces
        print("alive", flush=True)
    """)
    assert got.returncode == 0 and got.stdout.split() == ["theirs", "alive"], got.stderr


def test_a_handler_installed_before_the_watcher_announces_through_a_wrapper():
    """submitit installs its USR2 requeue before the worker starts the watcher:
    wrapped, its runs count as taken."""
    got = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, time
        os.environ["WATTSWEEP_STUCK_GRACE_S"] = "0.3"
        signal.signal(signal.SIGUSR2, lambda *a: print("theirs", flush=True))
        from workers import stop
        stop.watch()
        stop.push_action(lambda signum, notes: print("action", flush=True))
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(1.0)
        print("alive", flush=True)
    """)], capture_output=True, text=True, timeout=30)
    assert got.returncode == 0 and got.stdout.split() == ["theirs", "alive"], (got.stdout, got.stderr)


def test_signals_folded_into_one_handler_run_are_all_taken():
    """Two SIGTERMs during one short C call: one handler run, two wakeup bytes.
    The second byte must not read as a signal the main thread missed."""
    got = run("""
        def handler(*a):
            stop.handled()
            print("handled", flush=True)
        signal.signal(signal.SIGTERM, stop.announces(handler))
        import ctypes, threading
        threading.Timer(0.1, lambda: (os.kill(os.getpid(), signal.SIGTERM), os.kill(os.getpid(), signal.SIGTERM))).start()
        ctypes.CDLL(None).system(b"sleep 0.4 </dev/null >/dev/null 2>&1")
        time.sleep(1.5)  # three graces
        print("alive", flush=True)
    """)
    assert got.returncode == 0 and "alive" in got.stdout and "action" not in got.stdout, (got.stdout, got.stderr)


def test_an_old_handler_run_does_not_cover_a_later_stuck_signal():
    """A handled() with no signal behind it (a queued re-run of a handler) left
    the flag set, and a stuck signal much later read as taken."""
    got = run("""
        def handler(*a):
            stop.handled()
            sys.exit(1)
        signal.signal(signal.SIGTERM, stop.announces(handler))
        stop.handled()  # spurious
        time.sleep(1.0)
        import ctypes, threading
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        ctypes.CDLL(None).system(b"exec sleep 5 </dev/null >/dev/null 2>&1")  # exec: no shell holds the pipes
        print("not reached", flush=True)
    """)
    assert got.returncode == 128 + signal.SIGTERM and f"action {int(signal.SIGTERM)}" in got.stdout, got.stderr


def test_another_wakeup_fd_is_left_in_place():
    """An event loop's wakeup fd is not displaced: no watcher then."""
    got = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import signal, socket
        a, b = socket.socketpair(); b.setblocking(False)
        signal.set_wakeup_fd(b.fileno())
        from workers import stop
        assert stop.watch() is None
        assert signal.set_wakeup_fd(-1) == b.fileno()
        print("ok")
    """)], capture_output=True, text=True, timeout=30)
    assert got.stdout.strip() == "ok", got.stderr
