"""Cell states from the sweep folder alone (no queue), resubmit choice, bad folders."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.contracts import REQUESTS_SCHEMA, CellParams, RunOptions, SweepPaths, write_done, write_failed
from orchestrator.plan.planned import PlannedCell, write_plan
from orchestrator.status.resubmit_cmd import choose
from orchestrator.status.state import StatusError, checksum_verdict, sweep_status
from orchestrator.submit.base import SubmissionRecord, append_submissions

TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 256}


def make_cell(batch_size: int = 1, shards: int = 1, feasible: bool = True, launcher: str = "slurm") -> PlannedCell:
    p = CellParams(model="llama-tiny", model_args=TINY, weights="random", dtype="float32", shards=shards,
                   batch_size=batch_size, power_cap_w=None, dataset="synthetic", dataset_path=None, n_prompts=4,
                   max_prompt_tokens=16, max_new_tokens=8, sort_by_length=False, tokenizer_path=None,
                   gpu_kind="v100", seed=0)
    return PlannedCell(p.cell_id, p, RunOptions(gpu_backend="simulated"), {"name": launcher}, 1, feasible,
                       None if feasible else "does not fit")


def write_requests(paths: SweepPaths, cid: str) -> None:
    f = paths.requests_file(cid)
    f.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([], schema=REQUESTS_SCHEMA), f)


@pytest.fixture
def sweep(tmp_path):
    """Six cells: done, corrupted, failed, missing, never submitted, infeasible."""
    paths = SweepPaths.of(tmp_path / "sweep")
    cells = [make_cell(batch_size=b) for b in range(1, 6)] + [make_cell(batch_size=9, feasible=False)]
    write_plan(paths, cells)
    ids = [c.cell_id for c in cells]
    append_submissions(paths, [SubmissionRecord(tuple(ids[:4]), "slurm", tuple(f"999999_{i}" for i in range(4)), True,
                                                1.0, 0, {"array_job_id": "999999"})])
    for cid in ids[:2]:
        write_requests(paths, cid)
        write_done(paths, cid, {"requests/rank-0.parquet": 0}, {"hosts": ["n1"]})
    paths.requests_file(ids[1]).write_bytes(b"PAR1 not really")
    write_failed(paths, ids[2], "RuntimeError: boom", "Traceback ...")
    return paths, ids


def test_states_from_markers(sweep, monkeypatch):
    import orchestrator.status.state as state

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    st = sweep_status(paths, query_queue=False)
    got = {c.cell_id: c.state for c in st.cells}
    assert [got[i] for i in ids] == ["done", "invalid", "failed", "missing", "planned", "infeasible"]
    by = {c.cell_id: c for c in st.cells}
    assert by[ids[1]].reason == "requests/rank-0.parquet: sha256 does not match DONE.json"
    assert by[ids[2]].reason == "RuntimeError: boom" and by[ids[0]].array_index == 0
    assert st.counts["done"] == 1 and not st.all_ended  # "planned" has not ended


def test_resubmit_choice(sweep, monkeypatch, capsys):
    import orchestrator.status.state as state

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    st = sweep_status(paths, query_queue=False)
    assert choose(st, None, False) == ids[1:5]
    assert choose(st, [ids[0], ids[2]], False) == [ids[2]]
    assert "skipping" in capsys.readouterr().out
    assert choose(st, [ids[0]], True) == [ids[0]]
    with pytest.raises(ValueError, match="unknown cell id"):
        choose(st, ["nope"], False)


def test_malformed_folder_names_the_file(sweep, capsys):
    from orchestrator.status import cmd

    paths, ids = sweep
    with open(paths.plan_jsonl, "a") as f:
        f.write('{"id": "x"}\n')
    with pytest.raises(StatusError, match=r"plan.jsonl:7: malformed plan line"):
        sweep_status(paths, query_queue=False)
    paths.plan_jsonl.unlink()
    rc = cmd.run(cmd_args(paths))
    assert rc == 2 and "plan.jsonl: no plan file" in capsys.readouterr().err


def test_submissions_with_mismatched_ids(sweep):
    paths, ids = sweep
    with open(paths.submissions_jsonl, "a") as f:
        f.write(json.dumps({"cell_ids": ids[:2], "launcher": "slurm", "job_ids": ["1"]}) + "\n")
    with pytest.raises(StatusError, match="submissions.jsonl: a line has 2 cell ids but 1 job ids"):
        sweep_status(paths, query_queue=False)


def test_a_line_cut_short_is_skipped_with_a_warning_and_the_next_append_starts_clean(sweep, monkeypatch, capsys):
    """A crash while recording a submission leaves half a line: status and
    resubmit still work (that submission's cells show as planned), and the
    next submission is recorded on a line of its own."""
    import orchestrator.status.state as state

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    with open(paths.submissions_jsonl, "a") as f:
        f.write('{"cell_ids": ["' + ids[4])  # torn
    st = sweep_status(paths, query_queue=False)
    assert {c.cell_id: c.state for c in st.cells}[ids[4]] == "planned"
    assert "submissions.jsonl:2: skipped a line cut short" in capsys.readouterr().err
    append_submissions(paths, [SubmissionRecord((ids[4],), "slurm", ("1000",), False, 2.0, 0, {})])
    st = sweep_status(paths, query_queue=False)
    assert {c.cell_id: c.job_id for c in st.cells}[ids[4]] == "1000"


def test_a_json_line_that_is_not_a_record_is_refused(sweep):
    paths, ids = sweep
    with open(paths.submissions_jsonl, "a") as f:
        f.write('["not", "a", "record"]\n')
    with pytest.raises(StatusError, match=r"submissions.jsonl:2: malformed submission line"):
        sweep_status(paths, query_queue=False)


def test_watch_stops_when_only_never_submitted_cells_are_left(sweep, monkeypatch, capsys):
    from orchestrator.status import cmd

    import orchestrator.status.state as state

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    monkeypatch.setattr(cmd, "sweep_status", lambda p, validate, deep: sweep_status(p, query_queue=False))
    assert cmd.run(cmd_args(paths, watch=True)) == 1
    assert "1 cell(s) were never submitted; nothing to wait for" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_watch_interval_must_be_positive(value, capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(["status", "x", "--watch", "--interval", value])
    assert e.value.code == 2
    assert f"{value!r} is not a positive number of seconds" in capsys.readouterr().err


def cmd_args(paths: SweepPaths, **kw):
    import argparse

    base = {"sweep_dir": str(paths.root), "json": False, "watch": False, "interval": 0.1, "no_validate": False,
            "deep": False}
    return argparse.Namespace(**{**base, **kw})


def test_status_json(sweep, capsys):
    from orchestrator.status import cmd

    paths, ids = sweep
    assert cmd.run(cmd_args(paths, json=True)) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["cells"]) == 6 and d["counts"]["infeasible"] == 1



def test_unreachable_slurm_gives_unknown_states_and_blocks_resubmit(sweep, monkeypatch, capsys):
    """With squeue failing, cells without markers are 'unknown', never 'missing', and
    resubmit refuses: a requeued cell would otherwise run twice."""
    import orchestrator.status.state as state
    from orchestrator.status import cmd, resubmit_cmd
    from orchestrator.submit.shell import SlurmCommandError

    def down(ids):
        raise SlurmCommandError(["squeue"], "squeue failed: Unable to contact slurm controller")

    monkeypatch.setattr(state, "squeue_jobs", down)
    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    st = sweep_status(paths)
    got = {c.cell_id: c.state for c in st.cells}
    assert got[ids[3]] == "unknown" and got[ids[0]] == "done" and got[ids[2]] == "failed"
    assert "Unable to contact" in st.queue_error
    assert cmd.run(cmd_args(paths)) == 0
    captured = capsys.readouterr()
    assert "states come from the sweep folder only" in captured.err
    assert "no Slurm accounting" not in captured.out  # unreachable is not "no accounting"
    assert cmd.run(cmd_args(paths, watch=True)) == 2  # unknown states would never end
    assert "stopped watching" in capsys.readouterr().err
    args = cmd_args(paths)
    args.cells, args.force, args.dry_run, args.launcher = None, False, False, []
    assert resubmit_cmd.run(args) == 2
    assert "cannot resubmit while Slurm cannot be asked" in capsys.readouterr().err


def test_a_cell_out_of_requeues_at_its_time_limit_is_a_timeout(sweep, monkeypatch):
    """submitit fails such a job itself (sacct says FAILED): the marker tells."""
    import orchestrator.status.state as state

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    paths, ids = sweep
    write_failed(paths, ids[3], "UncompletedJobError: Job not requeued because: timed-out too many times.", "")
    cell = {c.cell_id: c for c in sweep_status(paths, query_queue=False).cells}[ids[3]]
    assert cell.state == "timeout" and "--launcher time_min=N" in cell.reason
    # a local cell: the local launcher's own key (it has no time_min)
    append_submissions(paths, [SubmissionRecord((ids[3],), "local", ("4321",), False, 3.0, 1, {})])
    write_failed(paths, ids[3], "UncompletedJobError: Job not requeued because: timed-out too many times.", "")
    cell = {c.cell_id: c for c in sweep_status(paths, query_queue=False).cells}[ids[3]]
    assert cell.state == "timeout" and "--launcher timeout_min=N" in cell.reason, cell.reason
    # `sweep --wait` says it as status does: a timeout, not a failure
    from orchestrator.submit.sweep_cmd import _why_lost

    assert _why_lost(paths.root, ids[3], {}, {ids[3]: 1}).startswith("timeout: UncompletedJobError")
    write_failed(paths, ids[2], "RuntimeError: out of memory", "")
    assert _why_lost(paths.root, ids[2], {}, {}).startswith("failed: ")


def _resubmit_args(paths, **kw):
    import argparse

    return argparse.Namespace(**{"sweep_dir": str(paths.root), "cells": None, "force": False, "dry_run": False,
                                 "launcher": [], **kw})


def test_resubmit_changes_launcher_settings_but_not_the_cells(sweep, monkeypatch, capsys):
    import orchestrator.status.state as state
    from orchestrator.status import resubmit_cmd
    from orchestrator.submit import base

    monkeypatch.setattr(state, "_validate", lambda p, ids, deep=True: {c: checksum_verdict(p, c) for c in ids})
    monkeypatch.setattr(state, "squeue_jobs", lambda ids: {})
    monkeypatch.setattr(state, "sacct_jobs", lambda ids: {})
    seen = []

    class Recorder:
        def submit(self, paths, cells, dry_run=False):
            seen.extend(cells)
            return []

    monkeypatch.setattr(base, "get_launcher", lambda name, cfg: Recorder())
    paths, ids = sweep
    assert resubmit_cmd.run(_resubmit_args(paths, launcher=["time_min=240", "launcher.partition=long"])) == 0
    assert seen and all(c.launcher["time_min"] == 240 and c.launcher["partition"] == "long" for c in seen)
    assert {c.cell_id for c in seen} <= set(ids)
    assert resubmit_cmd.run(_resubmit_args(paths, launcher=["time_minutes=240"])) == 2
    assert "--launcher time_minutes: not a setting of the slurm launcher; valid: partition" in capsys.readouterr().err
    assert resubmit_cmd.run(_resubmit_args(paths, launcher=["time_min=1"])) == 2  # the 90 s warning would come first
    assert "signal_delay_s=90" in capsys.readouterr().err


def test_one_submitter_of_a_sweep_at_a_time(sweep, monkeypatch, capsys):
    """Two resubmits run together both saw the failed cells and both submitted them:
    the second waits for the first, names it, and gives up after LOCK_WAIT_S."""
    import fcntl
    import threading

    from orchestrator.cli import main
    from orchestrator.status import common, state

    paths, ids = sweep
    monkeypatch.setattr(state, "squeue_jobs", lambda ids: {})  # the jobs have left the queue
    monkeypatch.setattr(state, "sacct_jobs", lambda ids: {})  # (no cluster needed)
    monkeypatch.setattr(common, "LOCK_WAIT_S", 0.5)
    with open(paths.root / ".submit.lock", "a+") as held:  # another open file: flock conflicts in-process too
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 resubmit\n")
        held.flush()
        assert main(["resubmit", str(paths.root)]) == 2
        err = capsys.readouterr().err
        assert "waiting up to 0.5 s for `wattsweep resubmit` (pid 4242)" in err
        assert "`wattsweep resubmit` (pid 4242) is changing the cells of" in err
        monkeypatch.setattr(common, "LOCK_WAIT_S", 30.0)
        threading.Timer(0.5, fcntl.flock, (held, fcntl.LOCK_UN)).start()
        assert main(["cancel", str(paths.root)]) == 0  # waited, then found nothing to cancel
    assert "nothing to cancel" in capsys.readouterr().out


def test_status_checks_checksums_and_deep_also_parses(sweep):
    """A file rewritten with its new checksum put into DONE.json passes the checksum
    check; only the deep check (what resubmit uses) finds that it is not Parquet."""
    from orchestrator.contracts import read_json, sha256_file, atomic_write_json

    paths, ids = sweep
    bad = paths.requests_file(ids[0])
    bad.write_bytes(b"not parquet at all")
    done = read_json(paths.done_marker(ids[0]))
    done["files"]["requests/rank-0.parquet"]["sha256"] = sha256_file(bad)
    atomic_write_json(paths.done_marker(ids[0]), done)
    fast = {c.cell_id: c.state for c in sweep_status(paths, query_queue=False, deep=False).cells}
    deep = {c.cell_id: c for c in sweep_status(paths, query_queue=False, deep=True).cells}
    assert fast[ids[0]] == "done" and fast[ids[1]] == "invalid"
    assert deep[ids[0]].state == "invalid"


def test_parameters_label_names_a_non_default_kv_cache():
    from dataclasses import replace

    from orchestrator.status.state import params_label

    cell = make_cell(batch_size=64)
    assert params_label(cell) == "llama-tiny x1 b64 uncapped synthetic"
    fp8 = replace(cell, params=replace(cell.params, kv_cache_dtype="float8_e4m3fn"))
    assert params_label(fp8) == "llama-tiny x1 b64 uncapped synthetic kv=float8_e4m3fn"


def test_elapsed_of_a_local_cell_comes_from_its_runner():
    from orchestrator.status.state import _local_elapsed_s

    assert _local_elapsed_s({"started_unix_s": 100.0, "ended_unix_s": 175.5}) == 75
    assert _local_elapsed_s({"state": "pending"}) is None
    assert _local_elapsed_s({"started_unix_s": 0.0}) > 0  # still running: up to now
    # a runner killed after its cell wrote DONE.json never records the end: the marker's time stops the clock
    assert _local_elapsed_s({"started_unix_s": 100.0}, marker_mtime=104.2) == 4


def test_hints_quote_a_sweep_folder_with_a_space(tmp_path):
    """A command printed for copying must survive the shell: `wattsweep status my sweeps/run`
    named two folders."""
    from orchestrator.status.common import resolve_cell
    from orchestrator.submit.shell import quoted

    spaced = SweepPaths.of(tmp_path / "my sweeps" / "run two")
    with pytest.raises(ValueError) as err:
        resolve_cell(spaced, "fff", ids=["abc123"])
    assert f"`wattsweep status '{tmp_path}/my sweeps/run two'`" in str(err.value)
    assert quoted(tmp_path / "my sweeps" / "run two") == f"'{tmp_path}/my sweeps/run two'"
    assert quoted("/scratch/sweeps/a-1_b.c") == "/scratch/sweeps/a-1_b.c"  # nothing to quote: as it is
