"""The cap lifecycle, the same behaviour through every backend this machine
can run (simulated; nvidia-smi through the fake; capctl through the helper
run without sudo; NVML on a real card, read and observe only)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from fakes.gpu_rig import WRITE_BACKENDS, Rig, isolate
from orchestrator import cli
from workers.gpu.base import CapMismatchError, CapPermissionError, CapRangeError, GpuLostError
from workers.gpu.caps import CapPolicyError, CapSession
from workers.gpu.ledger import read_records
from workers.gpu.nvml import nvml_available

CELL = "c0ffee000000"
ALL = list(WRITE_BACKENDS) + (["nvml"] if nvml_available() else [])


@pytest.fixture(params=ALL)
def rig(request, tmp_path, monkeypatch) -> Rig:
    state = isolate(monkeypatch, tmp_path)
    return Rig(request.param, tmp_path, state)


@pytest.fixture(params=WRITE_BACKENDS)
def wrig(request, tmp_path, monkeypatch) -> Rig:
    """Backends that may change a (simulated) card."""
    state = isolate(monkeypatch, tmp_path)
    return Rig(request.param, tmp_path, state)


def session(rig: Rig, watts, *, indices=(0,), **opts) -> CapSession:
    options = rig.options(**opts)
    from workers.gpu import select_backend

    return CapSession(select_backend(options), list(indices), watts, cell_id=CELL, options=options,
                      ledger_paths=[rig.cell_ledger])


def actions(path: Path) -> list[tuple[str, str]]:
    return [(r["action"], r["result"]) for r in read_records(path)] if path.exists() else []


def audit_rc(*ledgers: Path) -> int:
    return cli.main(["audit", *sum((["--ledger", str(p)] for p in ledgers), []), "--format", "json"])


# -- normal end -----------------------------------------------------------------

def test_apply_then_restore_brings_back_the_previous_value_not_the_default(wrig):
    sim = wrig.sim()
    sim.set_power_limit_w(0, 280)  # a previous value that is neither default nor maximum
    with session(wrig, 150) as records:
        assert sim.get_power_limit_w(0) == 150
        (rec,) = records
        assert (rec.previous_w, rec.requested_w, rec.enforced_w, rec.observed_only) == (280, 150, 150, False)
    assert sim.get_power_limit_w(0) == 280
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]
    site = actions(wrig.site_ledger)
    assert ("apply", "ok") in site and ("restore", "ok") in site
    assert audit_rc(wrig.cell_ledger) == 0


def test_every_gpu_of_the_session_is_capped_and_restored(wrig):
    sim = wrig.sim()
    with session(wrig, 175, indices=(0, 1)):
        assert [sim.get_power_limit_w(i) for i in (0, 1, 2)] == [175, 175, 300]
    assert [sim.get_power_limit_w(i) for i in (0, 1, 2)] == [300, 300, 300]


def test_save_file_written_before_the_change_and_removed_after_restore(wrig):
    assert wrig.save_files() == []
    with session(wrig, 150):
        (path,) = wrig.save_files()
        saved = json.loads(path.read_text())
        assert saved["previous_w"] == 300 and saved["index"] == 0
    assert wrig.save_files() == []


def test_no_cap_leaves_the_card_alone_but_records_its_limit(rig):
    before = rig.backend(gpu_observe=True).get_power_limit_w(0)
    with session(rig, None) as (rec,):
        assert rec.enforced_w == before and rec.requested_w is None
    assert actions(rig.cell_ledger) == [] and rig.save_files() == []


# -- failures -------------------------------------------------------------------

def test_permission_denied_names_the_fix_and_changes_nothing(wrig):
    wrig.sim().set_fault("permission")
    with pytest.raises(CapPermissionError) as err:
        with session(wrig, 150):
            pytest.fail("the session must not start without its cap")
    msg = str(err.value)
    assert "wattsweep-capctl" in msg and "prolog" in msg and "docs/admin.md" in msg
    wrig.sim().set_fault(None)
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert ("apply", "failed") in actions(wrig.cell_ledger)
    assert audit_rc(wrig.cell_ledger) == 0


@pytest.mark.parametrize("watts", [50, 301, 1000])
def test_out_of_range_is_rejected_not_clamped(wrig, watts):
    with pytest.raises(CapRangeError, match="100-300 W"):
        with session(wrig, watts):
            pytest.fail("no session under a clamped cap")
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []


def test_driver_range_refusal_is_a_range_error(wrig):
    wrig.sim().set_fault("range")
    with pytest.raises(CapRangeError):
        with session(wrig, 150):
            pass
    wrig.sim().set_fault(None)
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []


def test_mismatch_fails_the_cell_and_restores_the_cap(wrig):
    sim = wrig.sim()
    sim.set_power_limit_w(0, 250)
    sim.set_fault("mismatch")  # the next set enforces requested + 20 W
    with pytest.raises(CapMismatchError, match="enforces 170 W after a request of 150 W"):
        with session(wrig, 150):
            pytest.fail("never measured under the wrong cap")
    assert sim.get_power_limit_w(0) == 250 and wrig.save_files() == []
    recs = read_records(wrig.cell_ledger)
    assert [(r["action"], r["result"]) for r in recs] == [("apply", "failed"), ("restore", "ok")]
    assert recs[0]["enforced_w"] == 170 and "170" in recs[0]["error"]
    assert audit_rc(wrig.cell_ledger) == 0


def test_mismatch_from_run_options_on_the_simulated_backend(tmp_path, monkeypatch):
    rig = Rig("simulated", tmp_path, isolate(monkeypatch, tmp_path))
    with pytest.raises(CapMismatchError):
        with session(rig, 150, gpu_fail="mismatch"):
            pass
    assert rig.sim().get_power_limit_w(0) == 300


def test_lost_gpu_fails_and_is_repaired_once_back(wrig):
    wrig.sim().set_fault("lost")
    with pytest.raises(GpuLostError, match="lost"):
        with session(wrig, 150):
            pass
    wrig.sim().set_fault(None)  # the card is back
    assert cli.main(["caps", "restore", "--all", "--force"]) == 0
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert audit_rc(wrig.cell_ledger, wrig.site_ledger) == 0


def test_policy_breach_at_apply_time_is_rejected(wrig):
    policy = wrig.tmp / "policy.yaml"
    policy.write_text("rules:\n  - gpu: '*V100*'\n    caps_w: [250, 175, 150]\n")
    with pytest.raises(CapPolicyError, match="not an allowed cap"):
        with session(wrig, 200, policy_path=str(policy)):
            pass
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    with session(wrig, 175, policy_path=str(policy)):
        assert wrig.sim().get_power_limit_w(0) == 175


def test_exception_inside_the_session_restores(wrig):
    with pytest.raises(ZeroDivisionError):
        with session(wrig, 150):
            1 / 0
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


# -- observe mode ---------------------------------------------------------------

def test_observe_mode_reads_and_records_but_never_writes(rig):
    reader = rig.backend(gpu_observe=True)
    backend_limit = reader.get_power_limit_w(0)
    info = next(d for d in reader.devices() if d.index == 0)
    want = 175 if info.min_limit_w <= 175 <= info.max_limit_w else info.min_limit_w  # a real card's range
    s = session(rig, want, gpu_observe=True)
    if rig.kind != "nvml":
        # any setter call is a failure
        s.backend.set_power_limit_w = lambda *a: pytest.fail(f"observe mode called a setter {a}")
    with s as (rec,):
        assert rec.observed_only and rec.requested_w == want and rec.enforced_w == backend_limit
        assert rig.save_files() == []
    assert s.backend.would_set == {0: want}
    assert rig.backend(gpu_observe=True).get_power_limit_w(0) == backend_limit
    assert actions(rig.cell_ledger) == [("apply", "observed")]
    assert audit_rc(rig.cell_ledger) == 0


# -- signals and kills (subprocesses) ----------------------------------------------

HOLDER = textwrap.dedent("""
    import json, signal, sys, time
    from pathlib import Path
    from orchestrator.contracts import RunOptions
    from workers.gpu import select_backend
    from workers.gpu.caps import CapSession
    options = RunOptions.from_dict(json.loads(sys.argv[1]))
    marker = Path(sys.argv[3])
    def previous(signum, frame):  # stands in for submitit's USR2 handler: checkpoint, requeue, exit
        marker.write_text(str(signum))
        sys.exit(99)
    signal.signal(signal.SIGUSR2, previous)
    with CapSession(select_backend(options), [0], 150, cell_id="c0ffee000000", options=options,
                    ledger_paths=[Path(sys.argv[2])]):
        print("capped", flush=True)
        time.sleep(60)
""")


def hold_cap(rig: Rig, holder: str = HOLDER, **popen: Any) -> subprocess.Popen:
    script = rig.tmp / "holder.py"
    script.write_text(holder)
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(rig.options().to_dict()), str(rig.cell_ledger),
                             str(rig.tmp / "chained")], stdout=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    assert proc.stdout.readline().strip() == "capped"
    assert rig.sim().get_power_limit_w(0) == 150
    return proc


@pytest.mark.slow
def test_sigterm_restores_before_exiting(wrig):
    proc = hold_cap(wrig)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


# Blocked in C (glibc's system() waits through EINTR): Python's handler cannot run until it returns.
BLOCKED_HOLDER = HOLDER.replace("time.sleep(60)", 'import ctypes; ctypes.CDLL(None).system(b"sleep 120")')


@pytest.mark.slow
def test_sigterm_restores_while_the_main_thread_is_blocked_in_c(wrig, monkeypatch):
    """A rank blocked in a collective waiting on a hung rank never runs its
    handler; the stop watcher restores the cap from its own thread."""
    monkeypatch.setenv("WATTSWEEP_STUCK_GRACE_S", "1")
    proc = hold_cap(wrig, BLOCKED_HOLDER, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # into the blocking call
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM  # without the watcher: 120 s
        assert time.monotonic() - t0 < 15
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orphaned `sleep`, which holds the stderr pipe open
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]
    assert "not taken by the main thread within 1 s" in proc.stderr.read()


LATE_MAIN_HOLDER = HOLDER.replace("    time.sleep(60)", textwrap.indent(textwrap.dedent("""
    import ctypes, os, threading
    from workers.gpu.simulated import SimulatedBackend
    slow = SimulatedBackend.set_power_limit_w
    def set_from_watcher_slowly(self, i, w):  # the watcher's restore takes 1.5 s (NVML, a ledger on NFS)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(1.5)
        return slow(self, i, w)
    SimulatedBackend.set_power_limit_w = set_from_watcher_slowly
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    ctypes.CDLL(None).system(b"sleep 1.4")  # blocked for the grace, and back while the watcher restores
    time.sleep(30)"""), "    "))


@pytest.mark.slow
def test_a_main_thread_back_during_the_watchers_restore_waits_for_it(tmp_path, monkeypatch):
    """The watcher had taken the card to restore when the main thread came back:
    its handler found nothing left, said "restored" and exited, and the process
    ended under the watcher with the card still capped."""
    monkeypatch.setenv("WATTSWEEP_STUCK_GRACE_S", "1")
    rig = Rig("simulated", tmp_path, isolate(monkeypatch, tmp_path))
    proc = hold_cap(rig, LATE_MAIN_HOLDER)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert actions(rig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


@pytest.mark.slow
def test_a_signal_the_main_thread_takes_leaves_the_watcher_out(wrig, monkeypatch):
    """The normal path: the handler restores; the watcher, given a short grace,
    does not act too (one restore in the ledger, the handler's exit status)."""
    monkeypatch.setenv("WATTSWEEP_STUCK_GRACE_S", "0.2")
    proc = hold_cap(wrig, stderr=subprocess.PIPE)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]
    assert "watcher" not in proc.stderr.read()


@pytest.mark.slow
def test_preemption_signal_restores_then_chains_to_the_previous_handler(wrig):
    proc = hold_cap(wrig)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=30) == 99  # the previous handler ran (submitit requeues there)
    assert (wrig.tmp / "chained").read_text() == str(int(signal.SIGUSR2))
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []


@pytest.mark.slow
def test_sigkill_leaves_a_save_file_that_caps_restore_repairs(wrig):
    proc = hold_cap(wrig)
    proc.kill()
    proc.wait(timeout=30)
    assert wrig.sim().get_power_limit_w(0) == 150 and len(wrig.save_files()) == 1
    assert audit_rc(wrig.cell_ledger) == 1  # left capped: the apply has no restore
    assert cli.main(["caps", "restore", "--all"]) == 0
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert actions(wrig.cell_ledger)[-1] == ("repair", "ok")
    assert audit_rc(wrig.cell_ledger) == 0 and audit_rc(wrig.site_ledger) == 0


@pytest.mark.slow
def test_next_session_repairs_a_leftover_first_and_saves_the_true_previous(wrig):
    wrig.sim().set_power_limit_w(0, 280)
    proc = hold_cap(wrig)
    proc.kill()
    proc.wait(timeout=30)
    with session(wrig, 200) as (rec,):
        assert rec.previous_w == 280  # not the leftover 150
    assert wrig.sim().get_power_limit_w(0) == 280
    assert ("repair", "ok") in actions(wrig.cell_ledger)
    assert audit_rc(wrig.cell_ledger) == 0


def test_caps_restore_skips_a_save_file_whose_process_still_runs(wrig):
    with session(wrig, 150):
        assert cli.main(["caps", "restore", "--all"]) == 0  # skipped: its owner (this process) restores it
        assert wrig.sim().get_power_limit_w(0) == 150
    assert wrig.sim().get_power_limit_w(0) == 300
