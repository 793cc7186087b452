"""`wattsweep logs` finds the latest job's logs of a rank; `status --state` filters rows."""
from __future__ import annotations

import os

import pytest

from orchestrator.cli import main
from orchestrator.contracts import SweepPaths, write_failed
from orchestrator.plan.planned import write_plan
from orchestrator.submit.base import SubmissionRecord, append_submissions
from tests.test_status_state import make_cell


@pytest.fixture
def sweep(tmp_path):
    paths = SweepPaths.of(tmp_path / "sweep")
    cells = [make_cell(batch_size=1, shards=2), make_cell(batch_size=2)]
    write_plan(paths, cells)
    ids = [c.cell_id for c in cells]
    append_submissions(paths, [SubmissionRecord(tuple(ids), "slurm", ("77_0", "77_1"), True, 1.0, 0,
                                                {"array_job_id": "77"})])
    return paths, ids


def write_log(paths, cid, job, rank, out, err="", age_s=0.0):
    ldir = paths.launch_dir(cid)
    ldir.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("out", out), ("err", err)):
        p = ldir / f"{job}_{rank}_log.{suffix}"
        p.write_text(text)
        t = p.stat().st_mtime - age_s
        os.utime(p, (t, t))


def test_the_latest_jobs_logs_by_prefix_and_rank(sweep, capsys):
    paths, ids = sweep
    write_log(paths, ids[0], "77_0", 0, "".join(f"line {i}\n" for i in range(100)), "Traceback: boom\n")
    write_log(paths, ids[0], "99_0", 0, "a newer job's file the submissions do not name\n")  # newest, not latest
    write_log(paths, ids[0], "77_0", 1, "rank one\n")
    assert main(["logs", str(paths.root), ids[0][:5]]) == 0
    out = capsys.readouterr().out
    assert out.index("77_0_0_log.err") < out.index("Traceback: boom") < out.index("77_0_0_log.out")
    assert "line 99" in out and "line 70" in out and "line 69" not in out and "newer" not in out
    assert main(["logs", str(paths.root), ids[0], "--rank", "1", "--lines", "0"]) == 0
    assert "rank one" in capsys.readouterr().out


def test_without_a_submission_the_newest_logs_are_shown(sweep, capsys):
    paths, ids = sweep
    write_log(paths, ids[1], "5001", 0, "older\n", age_s=100)
    write_log(paths, ids[1], "5002", 0, "newer\n")
    paths.submissions_jsonl.unlink()
    assert main(["logs", str(paths.root), ids[1]]) == 0
    out = capsys.readouterr().out
    assert "newer" in out and "older" not in out


def test_a_failed_cell_shows_the_rank_that_failed_and_ranks_are_checked(sweep, capsys):
    paths, ids = sweep
    write_log(paths, ids[0], "77_0", 0, "rank 0: Connection closed by peer\n")
    write_log(paths, ids[0], "77_0", 1, "rank 1: RuntimeError: the real cause\n")
    write_failed(paths, ids[0], "RuntimeError: the real cause", "", {"rank": 1})
    assert main(["logs", str(paths.root), ids[0]]) == 0
    assert "the real cause" in capsys.readouterr().out
    assert main(["logs", str(paths.root), ids[0], "--rank", "2"]) == 2
    assert "has 2 rank(s): --rank 0..1" in capsys.readouterr().err


def test_a_pending_resubmission_points_at_the_earlier_jobs_logs(sweep, capsys):
    paths, ids = sweep
    write_log(paths, ids[1], "77_1", 0, "the cancelled attempt\n")
    append_submissions(paths, [SubmissionRecord((ids[1],), "slurm", ("88_0",), True, 2.0, 1, {"array_job_id": "88"})])
    assert main(["logs", str(paths.root), ids[1]]) == 1
    err = capsys.readouterr().err
    assert "latest job of cell" in err and "an earlier job's are there" in err and "77_1_0_log.out" in err


def test_no_logs_unknown_and_ambiguous_cells(sweep, capsys):
    paths, ids = sweep
    assert main(["logs", str(paths.root), ids[1]]) == 1
    assert "has no logs for rank 0 yet" in capsys.readouterr().err
    assert main(["logs", str(paths.root), "zz"]) == 2
    assert "no cell 'zz'" in capsys.readouterr().err
    assert main(["logs", str(paths.root), ""]) == 2
    with pytest.raises(SystemExit):
        main(["logs", str(paths.root), ids[0], "--lines", "-1"])
    assert "not a whole number >= 0" in capsys.readouterr().err


def test_status_state_filters_rows_and_keeps_the_counts_whole(sweep, monkeypatch, capsys):
    paths, ids = sweep
    write_failed(paths, ids[0], "RuntimeError: boom", "")
    assert main(["status", str(paths.root), "--state", "failed", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert ids[0] in out and ids[1] not in out and "2 cells:" in out
    with pytest.raises(SystemExit):
        main(["status", str(paths.root), "--state", "broken"])
    assert "unknown state 'broken'; valid: planned" in capsys.readouterr().err


def test_status_state_spelled_as_slurm_does_json_says_the_filter_and_watch_refuses_it(sweep, capsys):
    import json

    paths, ids = sweep
    write_failed(paths, ids[0], "RuntimeError: boom", "")
    assert main(["status", str(paths.root), "--state", "FAILED", "--no-validate", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [c["cell_id"] for c in d["cells"]] == [ids[0]] and d["state_filter"] == ["failed"]
    assert sum(d["counts"].values()) == 2
    assert main(["status", str(paths.root), "--state", "failed", "--watch"]) == 2
    assert "use one of them" in capsys.readouterr().err


def test_status_state_with_no_matching_cell_says_so(sweep, capsys):
    paths, _ = sweep
    assert main(["status", str(paths.root), "--state", "done,invalid", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "no cell is done or invalid" in out and "2 cells:" in out and "parameters" not in out


def test_a_rank_slurm_stopped_because_another_died_points_at_the_dead_one(sweep, capsys):
    """With srun --kill-on-bad-exit, the survivor is stopped by SIGTERM: its
    FAILED.json says so and its log has no end either. The killed rank is the
    one whose log stops and who wrote no marker; the marker's rank is not."""
    from orchestrator.status.state import failed_reason

    paths, ids = sweep
    write_log(paths, ids[0], "77_0", 0, "wattsweep worker: measuring\n")
    write_log(paths, ids[0], "77_0", 1, "wattsweep worker: measuring\n")
    write_failed(paths, ids[0], "SignalExit: stopped by SIGTERM; power caps were restored to their previous values",
                 "", {"rank": 0})
    assert failed_reason(paths, ids[0], 2).startswith("rank 1 was killed (log stops without an error")
    assert main(["logs", str(paths.root), ids[0]]) == 0
    captured = capsys.readouterr()
    assert "rank 1's log stops without an error" in captured.err and "77_0_1_log.out" in captured.out
    write_log(paths, ids[0], "77_0", 1, "Traceback (most recent call last):\nMemoryError\n")  # it ended by itself
    assert failed_reason(paths, ids[0], 2).startswith("SignalExit: stopped by SIGTERM")
