"""`wattsweep cancel`: the record, how status reads it, scancel's answers, the local runner."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orchestrator.cli import main
from orchestrator.contracts import SweepPaths, read_json, write_failed
from orchestrator.plan.planned import read_plan, write_plan
from orchestrator.status import cancel_cmd
from orchestrator.status.state import sweep_status
from orchestrator.submit.base import SubmissionRecord, append_submissions
from orchestrator.submit.cancellations import append_cancellation, cancellations_path, read_cancellations
from orchestrator.submit.shell import SlurmCommandError
from tests.test_status_state import make_cell


@pytest.fixture
def slurm_sweep(tmp_path):
    """Three Slurm cells of one array, submitted, none with a marker."""
    paths = SweepPaths.of(tmp_path / "sweep")
    cells = [make_cell(batch_size=b) for b in (1, 2, 3)]
    write_plan(paths, cells)
    ids = [c.cell_id for c in cells]
    append_submissions(paths, [SubmissionRecord(tuple(ids), "slurm", tuple(f"4242_{i}" for i in range(3)), True,
                                                1.0, 0, {"array_job_id": "4242"})])
    return paths, ids


def fake_queue(monkeypatch, live: dict, acct: dict | None = None):
    import orchestrator.status.state as state
    from orchestrator.status.slurm_queue import JobFacts

    def facts(jobs: dict, source: str) -> dict:
        return {j: JobFacts(j, s, None, None, None, source) for j, s in jobs.items()}

    monkeypatch.setattr(state, "squeue_jobs", lambda ids: facts(live, "squeue"))
    monkeypatch.setattr(state, "sacct_jobs", lambda ids: facts(acct or {}, "sacct"))


def by_id(paths):
    return {c.cell_id: c for c in sweep_status(paths, validate=False).cells}


def test_a_cancelled_job_that_left_the_queue_is_cancelled_before_accounting_says_so(slurm_sweep, monkeypatch):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_1": "RUNNING"}, acct={"4242_0": "RUNNING"})  # sacct lags
    append_cancellation(paths, {ids[0]: "4242_0", ids[1]: "4242_1"})
    got = by_id(paths)
    assert got[ids[0]].state == "cancelled" and "wattsweep cancel" in got[ids[0]].reason
    assert got[ids[1]].state == "running" and got[ids[1]].reason == "being cancelled (wattsweep cancel)"
    assert got[ids[2]].state == "missing"  # not cancelled, not queued: still missing


def test_a_worker_failed_marker_after_cancel_still_reads_cancelled(slurm_sweep, monkeypatch):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={})
    write_failed(paths, ids[0], "SignalExit: SIGTERM", "")
    append_cancellation(paths, {ids[0]: "4242_0"})
    assert by_id(paths)[ids[0]].state == "cancelled"


def test_a_cancel_of_an_earlier_job_does_not_touch_the_resubmitted_one(slurm_sweep, monkeypatch):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={})
    append_cancellation(paths, {ids[0]: "4242_0"})
    append_submissions(paths, [SubmissionRecord((ids[0],), "slurm", ("5000_0",), True, 2.0, 1, {"array_job_id": "5000"})])
    assert by_id(paths)[ids[0]].state == "missing"


def test_sacct_cancelled_shows_who_cancelled(slurm_sweep, monkeypatch):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={}, acct={"4242_0": "CANCELLED", "4242_1": "CANCELLED"})
    append_cancellation(paths, {ids[0]: "4242_0"})
    got = by_id(paths)
    assert got[ids[0]].state == got[ids[1]].state == "cancelled"
    assert "wattsweep cancel" in got[ids[0]].reason and got[ids[1]].reason is None  # scancel by hand: no record


def test_a_torn_record_line_is_skipped_with_a_warning(slurm_sweep, capsys):
    paths, ids = slurm_sweep
    cancellations_path(paths).write_text('{"unix_s": 1, "jobs": {"a"')
    append_cancellation(paths, {ids[0]: "4242_0"})
    got = read_cancellations(paths)
    assert list(got) == [ids[0]] and got[ids[0]].job_id == "4242_0"
    assert "not a cancel record" in capsys.readouterr().err


def test_scancel_refusals_are_named_per_job(monkeypatch):
    calls = []

    def fake_run(args, check=True, **kw):
        calls.append(args)
        err = "scancel: error: Kill job error on job id 7_1: Job/step already completing or completed\n"
        return subprocess.CompletedProcess(args, 1, "", err)

    monkeypatch.setattr("orchestrator.submit.shell.run_cmd", fake_run)
    assert cancel_cmd.scancel(["7_0", "7_1"]) == {"7_1": "Job/step already completing or completed"}
    assert calls == [["scancel", "7_0", "7_1"]]


def test_scancel_failing_as_a_whole_refuses_every_job(monkeypatch):
    monkeypatch.setattr("orchestrator.submit.shell.run_cmd",
                        lambda args, check=True, **kw: subprocess.CompletedProcess(
                            args, 1, "", "scancel: error: Unable to contact slurm controller\n"))
    refused = cancel_cmd.scancel(["7_0", "7_1"])
    assert set(refused) == {"7_0", "7_1"} and "Unable to contact" in refused["7_0"]


def test_cancel_command_records_only_what_scancel_took(slurm_sweep, monkeypatch, capsys):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_0": "RUNNING", "4242_1": "PENDING"})
    monkeypatch.setattr(cancel_cmd, "scancel", lambda jobs: {"4242_1": "Job/step already completing or completed"})
    assert main(["cancel", str(paths.root)]) == 1
    out, err = capsys.readouterr()
    assert f"cancelled {ids[0]}" in out and "cancelled 1 cell(s)" in out and "job 4242_1" in err
    assert list(read_cancellations(paths)) == [ids[0]]


def test_cancel_dry_run_unknown_ids_and_nothing_to_do(slurm_sweep, monkeypatch, capsys):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_0": "PENDING"})
    assert main(["cancel", str(paths.root), "--dry-run"]) == 0
    assert f"would cancel {ids[0]} (pending, slurm job 4242_0)" in capsys.readouterr().out
    assert not cancellations_path(paths).exists()
    assert main(["cancel", str(paths.root), "--cells", "nope"]) == 2
    assert "no cell 'nope'" in capsys.readouterr().err
    fake_queue(monkeypatch, live={})
    assert main(["cancel", str(paths.root), "--cells", ids[1][:6]]) == 0  # a prefix names the cell
    out = capsys.readouterr().out
    assert f"skipping {ids[1]}: missing" in out and "nothing to cancel: none of the cells named" in out


def test_cancel_refuses_when_slurm_cannot_be_asked(slurm_sweep, monkeypatch, capsys):
    import orchestrator.status.state as state

    paths, _ = slurm_sweep

    def down(ids):
        raise SlurmCommandError(["squeue"], "squeue: error: Unable to contact slurm controller")

    monkeypatch.setattr(state, "squeue_jobs", down)
    assert main(["cancel", str(paths.root)]) == 2
    assert "cannot tell which cells are queued" in capsys.readouterr().err


def test_a_second_cancel_of_a_job_already_cancelled_changes_nothing(slurm_sweep, monkeypatch, capsys):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_0": "RUNNING"})
    append_cancellation(paths, {ids[0]: "4242_0"})
    before = cancellations_path(paths).read_text()
    monkeypatch.setattr(cancel_cmd, "scancel", lambda jobs: pytest.fail(f"scancel {jobs} again"))
    assert main(["cancel", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert f"skipping {ids[0]}: already cancelled by" in out and "nothing to cancel" in out
    assert cancellations_path(paths).read_text() == before


@pytest.mark.parametrize("unix_s", ["1e400", "-1e20", "NaN", "true", '"noon"'])
def test_a_record_with_an_impossible_time_is_skipped(slurm_sweep, monkeypatch, capsys, unix_s):
    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={})
    cancellations_path(paths).write_text(f'{{"unix_s": {unix_s}, "by": {{"user": "x"}}, "jobs": {{"{ids[0]}": "4242_0"}}}}\n')
    assert read_cancellations(paths) == {}
    assert "not a cancel record" in capsys.readouterr().err
    assert by_id(paths)[ids[0]].state == "missing"


def test_a_record_that_cannot_be_written_says_what_was_cancelled(slurm_sweep, monkeypatch, capsys):
    import orchestrator.submit.cancellations as records

    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_0": "RUNNING"})
    monkeypatch.setattr(cancel_cmd, "scancel", lambda jobs: {})

    def full(paths, jobs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(records, "append_cancellation", full)
    assert main(["cancel", str(paths.root)]) == 1
    assert "Slurm jobs 4242_0 were cancelled, but the record could not be written (No space left on device)" \
        in capsys.readouterr().err


def test_a_local_cell_being_cancelled_reads_running_until_its_runner_reaps_it(tmp_path, monkeypatch):
    """The worker writes FAILED.json on the SIGTERM before the runner has reaped
    it: the cell must not read failed (resubmittable) in between."""
    import orchestrator.status.state as state

    paths = SweepPaths.of(tmp_path / "sweep")
    cell = make_cell(launcher="local")
    write_plan(paths, [cell])
    append_submissions(paths, [SubmissionRecord((cell.cell_id,), "local", ("77_0",), False, 1.0, 0, {})])
    append_cancellation(paths, {cell.cell_id: "77_0"})
    write_failed(paths, cell.cell_id, "SignalExit: stopped by SIGTERM", "")
    monkeypatch.setattr(state, "_local_states", lambda p: {cell.cell_id: {"state": "running", "job_id": "1"}})
    got = by_id(paths)[cell.cell_id]
    assert (got.state, got.reason) == ("running", "being cancelled (wattsweep cancel)")
    monkeypatch.setattr(state, "_local_states", lambda p: {cell.cell_id: {"state": "ended", "job_id": "1"}})
    assert by_id(paths)[cell.cell_id].state == "cancelled"


@pytest.mark.slow
def test_local_cancel_stops_the_running_cell_restores_its_cap_and_never_starts_the_next(tmp_path):
    """Two capped cells, one at a time: cancel stops the running one (SIGTERM:
    its worker restores the cap) and the runner never starts the other."""
    state_dir = tmp_path / "gpus"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "-m", "sweep_dir=out", "batch_size=1,2",
           "n_prompts=2", "max_new_tokens=2", "max_prompt_tokens=8", "dtype=float32", "gpu=simulated",
           "power_cap_w=150", "sleep_s=120", f"gpu.state_dir={state_dir}"]
    started = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    paths = SweepPaths.of(tmp_path / "out")
    ids = [c.cell_id for c in read_plan(paths)]
    deadline = time.monotonic() + 90
    while not _capped(state_dir):  # the first cell has set its cap and is sleeping
        assert time.monotonic() < deadline, "the first cell never set its cap"
        time.sleep(0.25)
    assert main(["cancel", str(paths.root)]) == 0
    deadline = time.monotonic() + 60
    while {c.state for c in sweep_status(paths, validate=False).cells} != {"cancelled"}:
        assert time.monotonic() < deadline, [(c.state, c.reason) for c in sweep_status(paths, validate=False).cells]
        time.sleep(0.25)
    assert not _capped(state_dir)  # the SIGTERM'd worker put the cap back
    assert not paths.done_marker(ids[0]).exists() and not (paths.cell_dir(ids[1]) / "telemetry").exists()
    queue = next((paths.root / "local").glob("queue-*.json"))
    assert all(e["state"] == "ended" and e["cancelled"] for e in read_json(queue)["cells"])
    assert json.loads(cancellations_path(paths).read_text())["jobs"].keys() == set(ids)


@pytest.mark.slow
def test_cancel_reaches_a_rank_blocked_in_a_collective(tmp_path):
    """Rank 1 hangs (ignores SIGTERM); rank 0 blocks in its next gloo collective,
    where Python cannot run its handler. On cancel, rank 0's stop watcher puts
    its cap back and writes FAILED.json within the grace; rank 1 is killed after
    the kill wait and its cap is repaired from its save file."""
    import os

    state_dir = tmp_path / "gpus"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "-m", "sweep_dir=out", "shards=2", "n_prompts=2",
           "max_new_tokens=2", "max_prompt_tokens=8", "dtype=float32", "gpu=simulated", "power_cap_w=150",
           "fail_on_purpose=hang-rank-1", f"gpu.state_dir={state_dir}"]
    env = {**os.environ, "WATTSWEEP_STUCK_GRACE_S": "2"}
    started = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert started.returncode == 0, started.stderr
    paths = SweepPaths.of(tmp_path / "out")
    (cid,) = [c.cell_id for c in read_plan(paths)]
    _wait(lambda: "hangs on purpose" in "".join(p.read_text(errors="replace") for p in paths.root.rglob("*.err")),
          90, "rank 1 to hang")
    time.sleep(1.0)  # rank 0 into its collective
    assert main(["cancel", str(paths.root)]) == 0
    failed = _wait(lambda: paths.failed_marker(cid).exists() and read_json(paths.failed_marker(cid)), 15,
                   "rank 0's FAILED.json (the grace, not the kill wait)")
    assert failed["rank"] == 0 and failed["stopped_blocked"] is True
    assert failed["error"].startswith("stopped by SIGTERM while blocked for 2 s in ")
    assert "power caps were restored" in failed["error"] and "Main thread, blocked:" in failed["traceback"]
    restored = [r["index"] for r in map(json.loads, paths.caps_ledger(cid).read_text().splitlines())
                if r["action"] == "restore" and r["result"] == "ok"]
    assert restored == [0]  # rank 0's card is back; rank 1 still hangs with its cap
    _wait(lambda: _states(paths)[cid][0] == "cancelled" and not _capped(state_dir), 60, "rank 1 killed and repaired")
    assert main(["audit", "--ledger", str(paths.root)]) == 0
    # The killed controller's KeyboardInterrupt is in the cell's own folder, not in the runner's log.
    _wait(lambda: "KeyboardInterrupt" in (paths.launch_dir(cid) / "controller.log").read_text(), 30,
          "the controller's traceback")
    assert "Traceback" not in next((paths.root / "local").glob("queue-*.log")).read_text()


def _capped(state_dir) -> bool:
    """Any simulated card below its default limit."""
    for f in state_dir.glob("nodes/*/simulated-*gpus.json"):
        gpus = json.loads(f.read_text()).get("gpus", [])
        if any(g["limit_w"] != g["default_limit_w"] for g in gpus):
            return True
    return False


@pytest.mark.parametrize("command", ["cancel", "resubmit"])
def test_a_folder_that_is_not_a_sweep_is_refused_and_left_as_it_was(tmp_path, command, capsys):
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    assert main([command, str(missing)]) == 2
    assert "no such folder" in capsys.readouterr().err and not missing.exists()
    assert main([command, str(empty)]) == 2
    assert "no plan file" in capsys.readouterr().err and list(empty.iterdir()) == []


@pytest.mark.slow
def test_a_dead_runners_cell_stays_running_until_cancel_stops_it_and_the_next_runner_waits(tmp_path):
    """kill -9 of the local runner left its running cell's processes alive: that
    cell read `missing` (resubmittable) and a new runner started cells on the
    same GPU. Now it reads running, `cancel` stops it, and a resubmit's runner
    waits for it before starting anything."""
    import os
    import signal

    state_dir = tmp_path / "gpus"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "-m", "sweep_dir=out", "batch_size=1,2",
           "n_prompts=2", "max_new_tokens=2", "max_prompt_tokens=8", "dtype=float32", "gpu=simulated",
           "power_cap_w=150", "sleep_s=120", f"gpu.state_dir={state_dir}"]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120).returncode == 0
    paths = SweepPaths.of(tmp_path / "out")
    first, second = [c.cell_id for c in read_plan(paths)]
    _wait(lambda: _capped(state_dir), 90, "the first cell's cap")
    queue = next((paths.root / "local").glob("queue-*.json"))
    os.kill(read_json(queue)["runner_pid"], signal.SIGKILL)
    got = _wait(lambda: _states(paths) if _states(paths)[first][0] == "running" and
                _states(paths)[second][0] == "missing" else None, 30, "the orphan read as running")
    assert "its runner died" in got[first][1]
    assert main(["resubmit", str(paths.root)]) == 0  # only the second cell
    time.sleep(2.0)
    assert not paths.done_marker(second).exists()  # its runner waits for the orphan
    assert "waiting for this sweep's earlier local work" in "".join(
        p.read_text() for p in (paths.root / "local").glob("queue-*.log"))
    cancelled_at = time.time()
    assert main(["cancel", str(paths.root), "--cells", first]) == 0
    _wait(lambda: _states(paths)[first][0] == "cancelled", 60, "the orphan stopped")
    new_queue = max((paths.root / "local").glob("queue-*.json"))
    started = _wait(lambda: read_json(new_queue)["cells"][0].get("started_unix_s"), 60, "the resubmitted cell")
    assert started >= cancelled_at  # not before the orphan was stopped
    assert main(["cancel", str(paths.root)]) == 0  # the resubmitted cell (it sleeps too)
    _wait(lambda: {s for s, _ in _states(paths).values()} == {"cancelled"} and not _capped(state_dir), 60, "all stopped")
    assert main(["audit", "--ledger", str(paths.root)]) == 0


def _states(paths):
    return {c.cell_id: (c.state, c.reason or "") for c in sweep_status(paths, validate=False).cells}


def _wait(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_a_cancelled_local_cell_that_does_not_exit_is_killed_after_kill_wait(tmp_path):
    from orchestrator.contracts import atomic_write_json
    from orchestrator.submit import local

    queue = tmp_path / "queue.json"
    atomic_write_json(queue, {"sweep_dir": str(tmp_path), "cells": [], "max_parallel": 1})
    runner = local._Runner(queue)

    class Job:
        cancels = 0

        def cancel(self, check=True):
            Job.cancels += 1

    now = time.time()
    fresh = {"cell_id": "a", "cancel_sent_unix_s": now - 1}
    stuck = {"cell_id": "b", "cancel_sent_unix_s": now - local.KILL_WAIT_S - 1}
    runner.running = [(fresh, Job(), []), (stuck, Job(), [])]
    runner._escalate()
    runner._escalate()
    assert Job.cancels == 1 and stuck["killed"] and not fresh.get("killed")


def test_sweep_wait_counts_cancelled_cells_as_cancelled(slurm_sweep, capsys):
    from orchestrator.submit.sweep_cmd import _reduce_and_print

    paths, ids = slurm_sweep
    append_cancellation(paths, {ids[0]: "4242_0"})
    write_failed(paths, ids[1], "RuntimeError: boom", "")
    assert _reduce_and_print(paths.root, ids[:2]) == 1
    err = capsys.readouterr().err
    assert "2 of 2 cell(s) gave no valid result (1 cancelled, 0 timed out, 1 failed or missing, 0 invalid)" in err
    assert f"{ids[0]}: cancelled: cancelled by" in err and f"{ids[1]}: failed: RuntimeError: boom" in err


def test_resubmit_says_why_a_cell_being_cancelled_is_not_rerun_yet(slurm_sweep, monkeypatch, capsys):
    from orchestrator.status import resubmit_cmd
    from orchestrator.status.state import sweep_status

    paths, ids = slurm_sweep
    fake_queue(monkeypatch, live={"4242_0": "RUNNING"})
    append_cancellation(paths, {ids[0]: "4242_0"})
    chosen = resubmit_cmd.choose(sweep_status(paths, validate=False), None, False)
    assert ids[0] not in chosen and f"skipping {ids[0]}: still being cancelled" in capsys.readouterr().out
