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
