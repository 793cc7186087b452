"""Save files name the card by UUID; a session never takes over a card that a
running session holds; a repair is recorded where the cap was applied; a
signal whose restore failed says so."""
from __future__ import annotations

import signal

import pytest

from fakes.gpu_rig import WRITE_BACKENDS, Rig, isolate
from test_caps_behaviour import actions, audit_rc, hold_cap, session
from workers.gpu.base import GpuError
from workers.gpu.caps import CapSession, SignalExit


@pytest.fixture(params=WRITE_BACKENDS)
def wrig(request, tmp_path, monkeypatch) -> Rig:
    state = isolate(monkeypatch, tmp_path)
    return Rig(request.param, tmp_path, state)


def test_the_save_file_is_named_by_the_cards_uuid(wrig):
    with session(wrig, 150) as (rec,):
        (save,) = wrig.save_files()
        assert rec.uuid and save.name == f"gpu-{rec.uuid}.json"


def test_a_card_that_is_not_visible_is_not_restored_through_another_index(wrig, monkeypatch):
    """Under Slurm's device cgroups a job's GPU 0 is not the epilog's GPU 0:
    the restore finds the card by UUID, and says where to run when it cannot."""
    if wrig.kind == "capctl":
        pytest.skip("the helper runs inside the job's device cgroup and ignores CUDA_VISIBLE_DEVICES")
    with session(wrig, 150):
        pass
    sim = wrig.sim()
    with pytest.raises(GpuError, match="not visible here"):
        with session(wrig, 150):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # the restore sees only another card
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sim.get_power_limit_w(0) == 150 and len(wrig.save_files()) == 1  # kept for the epilog
    from orchestrator import cli

    assert cli.main(["caps", "restore", "--all", "--force"]) == 0  # --force: the save file's writer is this test
    assert sim.get_power_limit_w(0) == 300 and wrig.save_files() == []


@pytest.mark.slow
def test_a_second_session_on_a_card_a_running_session_holds_is_refused(wrig):
    """Two cells given one GPU: before, the second "repaired" the first's cap
    mid-measurement and the first's restore then deleted the second's save file."""
    proc = hold_cap(wrig)
    try:
        with pytest.raises(GpuError, match="is capped by a running process: pid"):
            with session(wrig, 200):
                pass
        assert wrig.sim().get_power_limit_w(0) == 150 and len(wrig.save_files()) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert wrig.sim().get_power_limit_w(0) == 300 and wrig.save_files() == []
    assert actions(wrig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


@pytest.mark.slow
def test_the_next_sessions_repair_reaches_the_killed_sessions_ledger(wrig):
    """Before, the repair went only to the next cell's ledger and the site
    ledger: auditing the killed cell's sweep showed the card left capped."""
    proc = hold_cap(wrig)
    proc.kill()
    proc.wait(timeout=30)
    from workers.gpu import select_backend

    options = wrig.options()
    nxt = wrig.tmp / "next" / "caps.jsonl"
    with CapSession(select_backend(options), [0], 200, cell_id="feed00000000", options=options, ledger_paths=[nxt]):
        pass
    assert actions(wrig.cell_ledger)[-1] == ("repair", "ok")
    assert audit_rc(wrig.cell_ledger) == 0
    assert actions(nxt)[-2:] == [("apply", "ok"), ("restore", "ok")]


def test_a_signal_whose_restore_failed_does_not_claim_it_worked():
    assert "caps were restored" in str(SignalExit(signal.SIGTERM))
    msg = str(SignalExit(signal.SIGTERM, not_restored=2))
    assert "NOT restored on 2 GPU(s)" in msg and "caps restore --all" in msg and "were restored" not in msg


@pytest.mark.slow
def test_a_repair_record_names_who_repaired(wrig, monkeypatch):
    """The owner's user and job stay on the record (the audit pairs them with
    the apply); "by" names the process that put the card back."""
    import os

    from orchestrator import cli
    from workers.gpu.ledger import read_records

    proc = hold_cap(wrig)
    proc.kill()
    proc.wait(timeout=30)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # an admin's interactive job, say
    assert cli.main(["caps", "restore", "--all"]) == 0
    apply, repair = read_records(wrig.cell_ledger)
    assert repair["action"] == "repair" and repair["slurm_job_id"] == apply["slurm_job_id"]
    assert repair["by"]["pid"] == os.getpid() and repair["by"]["slurm_job_id"] == "777"
    assert apply["by"]["pid"] == proc.pid or wrig.kind == "capctl"  # the helper writes capctl's records


def test_a_signal_during_the_restore_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM arriving while the caps are being put back (the job's normal end
    meeting scancel): before, the handler ended the process between the
    restore's steps and the card stayed capped with no record."""
    import os

    from workers.gpu.simulated import SimulatedBackend

    state = isolate(monkeypatch, tmp_path)
    rig = Rig("simulated", tmp_path, state)
    real = SimulatedBackend.set_power_limit_w
    calls = []

    def set_and_get_signalled(self, index, watts):
        calls.append(watts)
        if len(calls) == 2:  # the restore's write
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, index, watts)

    monkeypatch.setattr(SimulatedBackend, "set_power_limit_w", set_and_get_signalled)
    with pytest.raises(SignalExit) as e:
        with session(rig, 150):
            pass
    assert e.value.code == 128 + signal.SIGTERM and "were restored" in str(e.value)
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert actions(rig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


def test_a_signal_inside_the_simulated_cards_locked_update_waits_for_it(tmp_path, monkeypatch):
    """SIGTERM while this process holds the simulated node's file lock: before,
    the handler's restore waited for that lock, held by the very code it had
    interrupted, and the process hung."""
    import os

    state = isolate(monkeypatch, tmp_path)
    rig = Rig("simulated", tmp_path, state)

    class Hung(Exception):
        pass

    def hung(signum, frame):
        raise Hung("the restore waited on its own lock")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(SignalExit) as e:
            s = session(rig, 150)
            with s:
                s.backend._update(lambda st: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "were restored" in str(e.value)
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert actions(rig.cell_ledger) == [("apply", "ok"), ("restore", "ok")]


def test_sigterm_before_and_after_a_cap_session_ends_the_worker(tmp_path, monkeypatch):
    """A cancel that arrived while the worker was starting used to be passed
    over (submitit's SIGTERM handler), and the cell went on to set its caps."""
    import os

    from workers.gpu.caps import stop_on_term

    state = isolate(monkeypatch, tmp_path)
    rig = Rig("simulated", tmp_path, state)
    old = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_term()
        with pytest.raises(SignalExit, match=r"stopped by SIGTERM \(no power cap was held at the time\)"):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()  # not reached: the handler raises first
        with pytest.raises(SignalExit, match="power caps were restored"):
            with session(rig, 150):
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()
        assert rig.sim().get_power_limit_w(0) == 300
        with pytest.raises(SignalExit, match="no power cap was held"):  # the session gave the handler back
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
    finally:
        signal.signal(signal.SIGTERM, old)
