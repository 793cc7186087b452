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
    assert "unknown cell id(s) nope" in capsys.readouterr().err
    fake_queue(monkeypatch, live={})
    assert main(["cancel", str(paths.root), "--cells", ids[1]]) == 0
    out = capsys.readouterr().out
    assert f"skipping {ids[1]}: missing" in out and "nothing to cancel" in out


def test_cancel_refuses_when_slurm_cannot_be_asked(slurm_sweep, monkeypatch, capsys):
    import orchestrator.status.state as state

    paths, _ = slurm_sweep

    def down(ids):
        raise SlurmCommandError(["squeue"], "squeue: error: Unable to contact slurm controller")

    monkeypatch.setattr(state, "squeue_jobs", down)
    assert main(["cancel", str(paths.root)]) == 2
    assert "cannot tell which cells are queued" in capsys.readouterr().err


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
