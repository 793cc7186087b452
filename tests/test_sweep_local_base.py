"""The launcher interface: records, cell folders, registry."""
from __future__ import annotations

import pytest

from orchestrator.contracts import SweepPaths
from orchestrator.submit.base import (
    LaunchError,
    SubmissionRecord,
    append_submissions,
    get_launcher,
    latest_submission_by_cell,
    next_attempt,
    prepare_cell_dir,
    read_submissions,
)
from orchestrator.submit.local import LocalLauncher


def test_records_append_and_read_back(tmp_path):
    paths = SweepPaths.of(tmp_path)
    a = SubmissionRecord(("c1", "c2"), "slurm", ("7_0", "7_1"), True, 1.5, 0, {"array_job_id": "7"})
    b = SubmissionRecord(("c2",), "slurm", ("9",), False, 2.5, 1)
    append_submissions(paths, [a])
    append_submissions(paths, [b])
    assert read_submissions(paths) == [a, SubmissionRecord(("c2",), "slurm", ("9",), False, 2.5, 1, {})]
    latest = latest_submission_by_cell(paths)
    assert latest["c1"][1] == "7_0" and latest["c2"][1] == "9"


def test_malformed_submission_line(tmp_path, capsys):
    """Not JSON: a line cut short by a crash, skipped with a warning. JSON but
    not a record: an error naming file and line."""
    paths = SweepPaths.of(tmp_path)
    paths.submissions_jsonl.write_text('{"cell_ids": ["a"], "launcher": "local", "job_ids": ["1"]}\n{oops\n')
    assert [r.cell_ids for r in read_submissions(paths)] == [("a",)]
    assert "submissions.jsonl:2: skipped a line cut short" in capsys.readouterr().err
    paths.submissions_jsonl.write_text('{"cell_ids": ["a"], "launcher": "local", "job_ids": ["1"]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="submissions.jsonl:2"):
        read_submissions(paths)


def test_prepare_cell_dir_moves_earlier_attempts_aside(tmp_path):
    paths = SweepPaths.of(tmp_path)
    assert prepare_cell_dir(paths, "abc") is None and next_attempt(paths, "abc") == 0
    assert paths.launch_dir("abc").is_dir()
    cdir = paths.cell_dir("abc")
    (cdir / "telemetry").mkdir()
    (cdir / "telemetry" / "rank-0.parquet").write_bytes(b"x")
    (cdir / "FAILED.json").write_text("{}")
    (cdir / "caps.jsonl").write_text("{}\n")
    assert next_attempt(paths, "abc") == 1
    assert prepare_cell_dir(paths, "abc") == 0
    assert (cdir / "attempts" / "0" / "telemetry" / "rank-0.parquet").read_bytes() == b"x"
    assert (cdir / "attempts" / "0" / "FAILED.json").exists()
    assert not (cdir / "telemetry").exists() and not (cdir / "FAILED.json").exists()
    assert (cdir / "caps.jsonl").exists()  # the ledger is append-only and stays
    assert next_attempt(paths, "abc") == 1
    (cdir / "DONE.json").write_text("{}")
    assert prepare_cell_dir(paths, "abc") == 1 and next_attempt(paths, "abc") == 2


def test_registry(monkeypatch):
    assert isinstance(get_launcher("local", {"max_parallel": 2}), LocalLauncher)
    with pytest.raises(LaunchError, match="unknown launcher 'pbs'; valid: local, slurm"):
        get_launcher("pbs", {})


@pytest.mark.parametrize("cap_w, hint", [(150.0, True), (None, False)])
def test_a_worker_killed_outright_is_marked_failed_with_the_cap_hint(tmp_path, cap_w, hint):
    """A worker killed by SIGKILL writes no marker and runs no restore: the
    runner's FAILED.json says so, and, for a capped cell, where the cap is."""
    from orchestrator.contracts import atomic_write_json, read_json
    from orchestrator.submit.local import _Runner

    paths = SweepPaths.of(tmp_path)
    queue = tmp_path / "queue.json"
    atomic_write_json(queue, {"sweep_dir": str(tmp_path), "cells": [], "max_parallel": 1})
    runner = _Runner(queue)

    class Killed:
        def result(self):
            raise RuntimeError("the process ended with signal 9")

    entry = {"cell_id": "abc", "job_id": "123", "exit": -9, "power_cap_w": cap_w}
    runner._mark_if_silent(entry, Killed())
    failed = read_json(paths.failed_marker("abc"))
    assert failed["error"].startswith("local job 123 ended (exit -9) without a marker")
    assert ("`wattsweep caps restore --all` puts them back" in failed["error"]) is hint
    assert "signal 9" in failed["traceback"]


def test_failed_marker_text_for_an_interrupt_and_a_bare_exception():
    from workers.entry import _error_text

    assert _error_text(KeyboardInterrupt()) == "KeyboardInterrupt: interrupted (SIGINT)"
    assert _error_text(RuntimeError()) == "RuntimeError"
    assert _error_text(ValueError("bad")) == "ValueError: bad"
    gone = _error_text(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:4242"))
    assert gone.startswith("RuntimeError: [../gloo") and "another rank probably ended first" in gone
