"""End to end on the development Slurm cluster, through the real CellTask path."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.contracts import SweepPaths, read_json
from orchestrator.plan.planned import PlannedCell, read_plan, write_plan
from orchestrator.status.state import sweep_status
from orchestrator.submit.base import LaunchError, get_launcher, read_submissions
from orchestrator.submit.shell import run_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SMALL = ["model=llama-tiny", "gpu=simulated", "n_prompts=2", "max_new_tokens=4", "max_prompt_tokens=16",
         "launcher=slurm", "launcher.gpus_per_node=1", "launcher.cpus_per_gpu=1", "launcher.time_min=10"]


def sweep_cli(sweep_dir: Path, *overrides: str) -> SweepPaths:
    assert main(["sweep", "-m", *SMALL, f"sweep_dir={sweep_dir}", *overrides]) == 0
    return SweepPaths.of(sweep_dir)


def plan_only(sweep_dir: Path, *overrides: str) -> tuple[SweepPaths, list[PlannedCell]]:
    """The plan `wattsweep sweep` would write, without submitting (tests edit it first)."""
    from orchestrator.config import compose_cells
    from orchestrator.plan import plan_cells

    composed = compose_cells([*SMALL, f"sweep_dir={sweep_dir}", *overrides], True)
    return SweepPaths.of(sweep_dir), plan_cells(composed)


def launch(paths: SweepPaths, cells: list[PlannedCell]) -> None:
    write_plan(paths, cells)
    get_launcher("slurm", cells[0].launcher).submit(paths, cells)


def wait_for(paths: SweepPaths, pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        st = sweep_status(paths)
        if pred(st):
            return st
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {[(c.cell_id, c.state, c.reason) for c in st.cells]}")
        time.sleep(1.0)


def states(st) -> dict[str, str]:
    return {c.cell_id: c.state for c in st.cells}


@pytest.fixture(scope="module")
def done_sweep(slurm_cluster, tmp_path_factory) -> SweepPaths:
    """A 2x2 sweep (shards 1,2 x batch 1,2) with one GPU per node: shards=2 spans both nodes."""
    paths = sweep_cli(tmp_path_factory.mktemp("sweep") / "s2x2", "shards=1,2", "batch_size=1,2")
    wait_for(paths, lambda st: st.all_ended, 240, "the 2x2 sweep")
    return paths


def test_2x2_sweep_with_a_two_node_cell_completes_and_reduces(done_sweep, capsys):
    st = sweep_status(done_sweep)
    assert set(states(st).values()) == {"done"}
    plan = {c.cell_id: c for c in read_plan(done_sweep)}
    for cid, cell in plan.items():
        done = read_json(done_sweep.done_marker(cid))
        assert done["world_size"] == cell.params.shards
        if cell.params.shards == 2:
            assert sorted(done["hosts"]) == ["n1", "n2"]  # one rank per node
            # rank 1 found rank 0 through the cell folder, not the job-seeded port
            assert done["rendezvous"] == "published"
            assert not list(done_sweep.launch_dir(cid).glob("rendezvous-*.json"))  # removed once joined
        else:
            assert done["rendezvous"] == "single"
        assert done["slurm"]["job_id"] and done["slurm"]["array_task_id"] is not None
        logs = list(done_sweep.launch_dir(cid).glob("*_0_log.out"))
        assert logs and logs[0].resolve().is_file()  # the cell's log, found from its own folder
        capsys.readouterr()
        assert main(["logs", str(done_sweep.root), cid, "--rank", str(cell.params.shards - 1)]) == 0
        assert "Starting with JobEnvironment" in capsys.readouterr().out
        assert main(["logs", str(done_sweep.root), cid[:8], "--lines", "0"]) == 0  # rank 0 says how far it got
        assert "wattsweep worker: measuring" in capsys.readouterr().out
    recs = read_submissions(done_sweep)
    assert len(recs) == 2 and all(r.array and len(r.cell_ids) == 2 for r in recs)  # one array per resource shape
    assert main(["reduce", str(done_sweep.root)]) == 0
    assert "4 cells reduced" in capsys.readouterr().out


def test_corrupted_shard_is_invalid_and_resubmitted(done_sweep, capsys):
    cell = next(c for c in read_plan(done_sweep) if c.params.shards == 1)
    shard = done_sweep.telemetry_file(cell.cell_id, 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))
    st = sweep_status(done_sweep)
    assert states(st)[cell.cell_id] == "invalid" and list(states(st).values()).count("invalid") == 1
    capsys.readouterr()
    assert main(["resubmit", str(done_sweep.root)]) == 0
    assert "resubmitted 1 cell(s)" in capsys.readouterr().out
    assert (done_sweep.attempts_dir(cell.cell_id) / "0" / "DONE.json").is_file()  # moved aside first
    st = wait_for(done_sweep, lambda st: st.all_ended, 120, "the resubmitted cell")
    assert set(states(st).values()) == {"done"}


def test_cancel_one_cell_then_resubmit_only_it(slurm_cluster, tmp_path, capsys):
    paths = sweep_cli(tmp_path / "cancel", "batch_size=1,2", "sleep_s=15")
    st = wait_for(paths, lambda st: any(c.state == "running" for c in st.cells), 60, "a running cell")
    victim = next(c for c in st.cells if c.state == "running")
    run_cmd(["scancel", victim.job_id])
    st = wait_for(paths, lambda st: states(st)[victim.cell_id] == "cancelled", 60, "the cancelled state")
    capsys.readouterr()
    assert main(["resubmit", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert "resubmitted 1 cell(s)" in out and victim.cell_id in out
    assert read_submissions(paths)[-1].cell_ids == (victim.cell_id,)
    assert main(["resubmit", str(paths.root)]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out
    st = wait_for(paths, lambda st: st.all_ended, 150, "every cell")
    assert set(states(st).values()) == {"done"}
    assert main(["reduce", str(paths.root)]) == 0


def test_wattsweep_cancel_reads_cancelled_as_soon_as_the_jobs_leave_the_queue(slurm_cluster, tmp_path, capsys):
    """Never `missing` in between, whatever sacct says yet; the record names the jobs."""
    from orchestrator.submit.cancellations import read_cancellations

    paths = sweep_cli(tmp_path / "wcancel", "batch_size=1,2,3", "sleep_s=60", "launcher.array_parallelism=2")
    wait_for(paths, lambda st: any(c.state == "running" for c in st.cells), 60, "a running cell")
    capsys.readouterr()
    assert main(["cancel", str(paths.root)]) == 0
    assert "cancelled 3 cell(s)" in capsys.readouterr().out
    seen: set[str] = set()

    def settled(st) -> bool:
        seen.update(c.state for c in st.cells)
        return all(c.state == "cancelled" for c in st.cells)

    st = wait_for(paths, settled, 60, "every cell cancelled")
    assert seen <= {"pending", "running", "cancelled"}, seen
    assert all("wattsweep cancel" in (c.reason or "") for c in st.cells)
    assert {c.cell_id: c.job_id for c in st.cells} == {k: v.job_id for k, v in read_cancellations(paths).items()}
    assert main(["cancel", str(paths.root)]) == 0
    assert "nothing to cancel" in capsys.readouterr().out


def test_raising_worker_fails_alone(slurm_cluster, tmp_path):
    paths, cells = plan_only(tmp_path / "raise", "batch_size=1,2")
    bad = dataclasses.replace(cells[1], options=dataclasses.replace(cells[1].options, fail_on_purpose="raise"))
    launch(paths, [cells[0], bad])
    st = wait_for(paths, lambda st: st.all_ended, 150, "both cells")
    assert states(st) == {cells[0].cell_id: "done", bad.cell_id: "failed"}
    failed = read_json(paths.failed_marker(bad.cell_id))
    assert "RuntimeError" in failed["error"] and "Traceback" in failed["traceback"]
    assert "raised on purpose" in next(c.reason for c in st.cells if c.cell_id == bad.cell_id)


def test_a_rank_killed_on_the_second_node_is_named(slurm_cluster, tmp_path):
    """Rank 1 of a two-node cell dies by SIGKILL (as the out-of-memory killer ends
    it): status names it, not rank 0's broken collective alone."""
    paths, (cell,) = plan_only(tmp_path / "kill", "shards=2", "fail_on_purpose=kill-rank-1")
    launch(paths, [cell])
    st = wait_for(paths, lambda st: st.all_ended, 150, "the cell")
    assert states(st) == {cell.cell_id: "failed"}
    assert read_json(paths.failed_marker(cell.cell_id))["rank"] == 0
    assert next(c.reason for c in st.cells).startswith("rank 1 was killed (log stops without an error")


def test_timed_out_cell_is_requeued_and_finishes(slurm_cluster, tmp_path):
    # time limit 1 min, USR2 30 s before it: the first attempt (sleeping 120 s) is
    # checkpointed and requeued by submitit; the requeued attempt does not sleep.
    paths, cells = plan_only(tmp_path / "timeout", "launcher.time_min=1", "launcher.max_requeues=2", "sleep_s=120",
                             "launcher.signal_delay_s=30")
    (cell,) = cells
    launch(paths, [cell])
    st = wait_for(paths, lambda st: st.all_ended, 200, "the requeued cell")
    assert states(st) == {cell.cell_id: "done"}
    assert read_json(paths.done_marker(cell.cell_id))["attempt"] >= 1


def test_sbatch_errors_name_the_cells(slurm_cluster, tmp_path):
    paths, cells = plan_only(tmp_path / "bad", "batch_size=1,2", "launcher.partition=nosuch")
    with pytest.raises(LaunchError, match=r"sbatch refused 2 cell\(s\).*(?i:invalid partition).*queued: 0 cell") as e:
        launch(paths, cells)
    assert "(sbatch exited 1)" in str(e.value) and ".submission_file" not in str(e.value)  # a removed script
    paths, cells = plan_only(tmp_path / "wide", "shards=1,4")  # shards=4 needs 4 one-GPU nodes; there are 2
    with pytest.raises(LaunchError) as e:
        launch(paths, cells)
    wide = next(c for c in cells if c.params.shards == 4)
    assert wide.cell_id in str(e.value) and "queued: 1 cell(s) in job(s)" in str(e.value)
    run_cmd(["scancel", read_submissions(paths)[0].extra["array_job_id"]])
