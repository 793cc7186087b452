"""The local launcher runs cells through submitit's local executor, detached."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from orchestrator.config import compose_cells
from orchestrator.contracts import CellTask, SweepPaths, write_done
from orchestrator.plan import plan_cells
from orchestrator.submit.base import LaunchError, make_task, read_submissions
from orchestrator.submit.gpu_leases import GpuLeases
from orchestrator.submit.local import LocalLauncher, local_queue_states


@dataclasses.dataclass(frozen=True)
class StandInTask(CellTask):
    """Stands in for the worker: joins the ranks with gloo through submitit's
    job environment, all-reduces the ranks, rank 0 writes DONE.json."""

    def __call__(self):
        import torch
        import torch.distributed as dist
        import os

        from submitit.helpers import TorchDistributedEnvironment

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # as the launcher set it (export() rewrites it)
        env = TorchDistributedEnvironment().export()
        dist.init_process_group("gloo", init_method="env://", rank=env.rank, world_size=env.world_size)
        total = torch.tensor([env.rank + 1])
        dist.all_reduce(total)
        paths = SweepPaths.of(self.sweep_dir)
        out = paths.cell_dir(self.cell_id) / f"standin-rank-{env.rank}.json"
        out.write_text(json.dumps({"rank": env.rank, "world": env.world_size, "sum": int(total), "attempt": self.attempt,
                                   "visible": visible}))
        dist.barrier()
        if self.options.sleep_s:
            time.sleep(self.options.sleep_s)
        if env.rank == 0:
            write_done(paths, self.cell_id, {}, {"stand_in": True})
        dist.destroy_process_group()
        return env.rank


class StandInLauncher(LocalLauncher):
    task_class = StandInTask

    def _stage(self, paths, cell):
        entry = super()._stage(paths, cell)
        task = make_task(paths, cell, entry["attempt"])
        with open(entry["task"], "wb") as f:
            cloudpickle.dump(self.task_class(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)}), f)
        return entry


@pytest.fixture()
def by_value():
    # The runner is another process: send the stand-in class by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _plan(tmp_path, monkeypatch, *overrides):
    monkeypatch.chdir(tmp_path)
    sweep = compose_cells(["sweep_dir=out", *overrides], multirun=True)
    return SweepPaths.of(sweep.sweep_dir), plan_cells(sweep)


@pytest.mark.slow
def test_two_ranks_rendezvous_with_gloo(tmp_path, monkeypatch, by_value):
    paths, cells = _plan(tmp_path, monkeypatch, "shards=2,3")
    launcher = StandInLauncher({"max_parallel": 1, "timeout_min": 5})
    records = launcher.submit(paths, cells)
    feasible = [c for c in cells if c.feasible]
    assert len(feasible) == 1 and records[0].cell_ids == (feasible[0].cell_id,)
    launcher.wait(paths, records)
    cid = feasible[0].cell_id
    ranks = [json.loads((paths.cell_dir(cid) / f"standin-rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["sum"] for r in ranks] == [3, 3]
    assert paths.done_marker(cid).exists()
    assert read_submissions(paths) == records
    assert local_queue_states(paths)[cid]["state"] == "ended"
    infeasible = [c.cell_id for c in cells if not c.feasible]
    assert not paths.cell_dir(infeasible[0]).exists()


@pytest.mark.slow
def test_submit_returns_at_once_and_cells_run_in_order(tmp_path, monkeypatch, by_value):
    paths, cells = _plan(tmp_path, monkeypatch, "seed=1,2", "sleep_s=1.5")
    launcher = StandInLauncher({"max_parallel": 1, "timeout_min": 5})
    t0 = time.monotonic()
    records = launcher.submit(paths, cells)
    assert time.monotonic() - t0 < 2.0
    # The runner survives this launcher object: wait on the queue file only.
    launcher._runners.clear()
    ids = [c.cell_id for c in cells]
    seen_running = set()
    deadline = time.monotonic() + 180  # generous: CI machines are slow and shared
    while time.monotonic() < deadline and not all(paths.done_marker(c).exists() for c in ids):
        states = local_queue_states(paths)
        running = [c for c, e in states.items() if e["state"] == "running"]
        assert len(running) <= 1  # max_parallel=1
        seen_running.update(running)
        time.sleep(0.1)
    assert all(paths.done_marker(c).exists() for c in ids)
    launcher.wait(paths, records)
    assert seen_running  # we saw a cell running while the command had returned
    ended = [local_queue_states(paths)[c]["ended_unix_s"] for c in ids]
    started = [local_queue_states(paths)[c]["started_unix_s"] for c in ids]
    assert started[1] >= ended[0] - 0.5  # one after another


@pytest.mark.slow
def test_rerun_moves_attempt_aside(tmp_path, monkeypatch, by_value):
    paths, cells = _plan(tmp_path, monkeypatch, "shards=1")
    launcher = StandInLauncher({"max_parallel": 1, "timeout_min": 5})
    launcher.wait(paths, launcher.submit(paths, cells))
    launcher.wait(paths, launcher.submit(paths, cells))
    cid = cells[0].cell_id
    assert (paths.attempts_dir(cid) / "0" / "DONE.json").exists()
    assert json.loads((paths.cell_dir(cid) / "standin-rank-0.json").read_text())["attempt"] == 1
    assert [r.attempt for r in read_submissions(paths)] == [0, 1]


def first_sweep(runs, entry):
    return next(str(paths.root.resolve()) for paths, e, _ in runs.values() if e is entry)


def _two_sweeps(tmp_path, monkeypatch, gpus):
    """Sweep a and sweep b, one 2-second cell each, submitted at once."""
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", gpus)
    monkeypatch.setenv("WATTSWEEP_LEASE_DIR", str(tmp_path / "leases"))
    out = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths, cells = _plan(tmp_path / name, monkeypatch, "shards=1", "sleep_s=2", f"seed={ord(name)}")
        launcher = StandInLauncher({"max_parallel": 1, "timeout_min": 5})
        out[name] = (paths, cells[0].cell_id, launcher, launcher.submit(paths, cells))
    for paths, cid, launcher, records in out.values():
        launcher.wait(paths, records)
        assert paths.done_marker(cid).exists()
    return {n: (paths, local_queue_states(paths)[cid], cid) for n, (paths, cid, _, _) in out.items()}


@pytest.mark.slow
def test_two_sweeps_on_one_gpu_take_turns(tmp_path, monkeypatch, by_value):
    """Before GPU leases, runners of two sweeps started both cells on GPU 0 at once."""
    runs = _two_sweeps(tmp_path, monkeypatch, "0")
    (_, a, _), (_, b, _) = runs["a"], runs["b"]
    first, second = sorted([a, b], key=lambda e: e["started_unix_s"])
    assert second["started_unix_s"] >= first["ended_unix_s"] - 0.3
    waiting = runs["b"] if second is b else runs["a"]
    log = Path(waiting[1]["queue"]).with_suffix(".log").read_text()
    assert "waits for 1 free GPU(s); held: GPU 0: " in log and f"of {first_sweep(runs, first)}" in log
    for paths, _, cid in runs.values():
        assert json.loads((paths.cell_dir(cid) / "standin-rank-0.json").read_text())["visible"] == "0"


@pytest.mark.slow
def test_two_sweeps_on_a_machine_without_gpus_lease_simulated_cards(tmp_path, monkeypatch, by_value):
    """Without a GPU, cells of two sweeps all ran on simulated card 0 at once: each booked
    the other's power as its own, and a capped cell failed on the other's cap."""
    from orchestrator.submit import local

    if local._gpu_uuids():
        pytest.skip("this machine has NVIDIA GPUs: its cells lease the real cards")
    runs = _two_sweeps(tmp_path, monkeypatch, "")  # WATTSWEEP_LOCAL_GPUS unset: the simulated node's cards
    cards = {json.loads((paths.cell_dir(cid) / "standin-rank-0.json").read_text())["visible"]
             for paths, _, cid in runs.values()}
    assert cards == {"0", "1"}


@pytest.mark.slow
def test_two_sweeps_on_two_gpus_run_side_by_side_on_different_cards(tmp_path, monkeypatch, by_value):
    runs = _two_sweeps(tmp_path, monkeypatch, "0,1")
    (_, a, _), (_, b, _) = runs["a"], runs["b"]
    assert max(a["started_unix_s"], b["started_unix_s"]) < min(a["ended_unix_s"], b["ended_unix_s"])  # overlap
    cards = {json.loads((paths.cell_dir(cid) / "standin-rank-0.json").read_text())["visible"]
             for paths, _, cid in runs.values()}
    assert cards == {"0", "1"}
    assert not GpuLeases(tmp_path / "leases").holders([0, 1])  # released when the cells ended


def test_a_bad_gpu_list_is_refused_at_submission(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "0,x")
    paths, cells = _plan(tmp_path, monkeypatch, "shards=1")
    with pytest.raises(LaunchError, match="WATTSWEEP_LOCAL_GPUS='0,x'; expected GPU indices such as 0,1"):
        LocalLauncher({"max_parallel": 1}).submit(paths, cells)


def test_a_dry_run_refuses_what_the_submission_would(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "0,x")
    assert main(["sweep", "-m", "sweep_dir=out", "--dry-run"]) == 2
    assert "WATTSWEEP_LOCAL_GPUS='0,x'; expected GPU indices" in capsys.readouterr().err
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "0")
    assert main(["sweep", "-m", "sweep_dir=out", "shards=2", "--dry-run"]) == 2
    assert "need more GPUs than the local launcher has: 1 (WATTSWEEP_LOCAL_GPUS)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_status_names_the_job_a_local_cells_logs_carry(tmp_path, monkeypatch, by_value):
    """Status showed the runner's id (<runner pid>_<index>); the log files carry the
    submitit controller's, so the logs of the job status named could not be found."""
    from orchestrator.plan.planned import write_plan
    from orchestrator.status.cmd import format_table
    from orchestrator.status.state import sweep_status

    paths, cells = _plan(tmp_path, monkeypatch, "shards=1")
    write_plan(paths, cells)
    launcher = StandInLauncher({"max_parallel": 1, "timeout_min": 5})
    records = launcher.submit(paths, cells)
    launcher.wait(paths, records)
    (cell,) = sweep_status(paths, validate=False).cells
    assert cell.job_id == records[0].job_ids[0] and cell.log_job and cell.log_job != cell.job_id
    assert (paths.launch_dir(cell.cell_id) / f"{cell.log_job}_0_log.out").is_file()
    assert f"{cell.log_job} ({cell.job_id})" in format_table(sweep_status(paths, validate=False))


def test_what_would_stop_the_runner_is_refused_at_submission(tmp_path, monkeypatch):
    """A cell wider than the GPU list, and a lease folder that cannot be used,
    were accepted, then failed in the runner (or killed it, silently)."""
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "0")
    monkeypatch.setenv("WATTSWEEP_LEASE_DIR", str(tmp_path / "leases"))
    paths, cells = _plan(tmp_path, monkeypatch, "shards=2")
    with pytest.raises(LaunchError, match=r"need more GPUs than the local launcher has: 1 \(WATTSWEEP_LOCAL_GPUS\)"):
        LocalLauncher({"max_parallel": 1}).submit(paths, cells)
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("WATTSWEEP_LEASE_DIR", str(tmp_path / "afile" / "leases"))
    paths, cells = _plan(tmp_path, monkeypatch, "shards=1")
    with pytest.raises(LaunchError, match="cannot make the GPU lease folder .*WATTSWEEP_LEASE_DIR"):
        LocalLauncher({"max_parallel": 1}).submit(paths, cells)
    for bad in ("0,0", " , ", "0,,1"):
        monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", bad)
        with pytest.raises(LaunchError, match="WATTSWEEP_LOCAL_GPUS"):
            LocalLauncher({"max_parallel": 1}).submit(paths, cells)


def _queued_on_gpu_0(tmp_path, monkeypatch):
    """A one-cell sweep queued for GPU 0, its runner not started (the test runs it)."""
    from orchestrator.plan.planned import write_plan

    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "0")
    monkeypatch.setenv("WATTSWEEP_LEASE_DIR", str(tmp_path / "leases"))
    paths, cells = _plan(tmp_path, monkeypatch, "shards=1")
    write_plan(paths, cells)
    launcher = LocalLauncher({"max_parallel": 1})
    monkeypatch.setattr(launcher, "_start_runner", lambda q: type("P", (), {"pid": os.getpid()})())
    (rec,) = launcher.submit(paths, cells)
    return paths, Path(rec.extra["queue"])


def test_status_says_what_a_waiting_local_cell_waits_for(tmp_path, monkeypatch):
    from orchestrator.status.state import sweep_status
    from orchestrator.submit.local import _Runner

    paths, queue = _queued_on_gpu_0(tmp_path, monkeypatch)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # another sweep's runner
    try:
        leases = GpuLeases(tmp_path / "leases")  # the folder the runner uses
        with leases._locked():
            leases._write(0, {"runner_pid": other.pid, "controller_pid": None, "cell_id": "x1",
                              "sweep": "/s/other", "user": "bob"})
        runner = _Runner(queue)
        assert runner._claim(runner.q["cells"][0]) is None
        (cell,) = sweep_status(paths, validate=False).cells
        assert cell.state == "pending"
        assert cell.reason == "waits for 1 free GPU(s); held: GPU 0: bob's cell x1 of /s/other"
    finally:
        other.kill()
        other.wait()


def test_a_cell_behind_another_sweeps_waiting_cell_says_so_and_its_place_ends_with_it(tmp_path, monkeypatch):
    from orchestrator.status.state import sweep_status
    from orchestrator.submit.gpu_leases import QUEUE_NAME, start_ticks
    from orchestrator.submit.local import _Runner

    paths, queue = _queued_on_gpu_0(tmp_path, monkeypatch)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # another sweep's runner
    try:
        waiting = tmp_path / "leases" / QUEUE_NAME
        waiting.parent.mkdir(parents=True, exist_ok=True)
        waiting.write_text(json.dumps([{"runner_pid": other.pid, "runner_start": start_ticks(other.pid), "user": "bob",
                                        "cell_id": "x1", "sweep": "/s/other", "n": 1, "gpus": ["0"],
                                        "since_unix_s": 1.0}]))
        runner = _Runner(queue)
        assert runner._claim(runner.q["cells"][0]) is None  # GPU 0 is free, but x1 waited first
        (cell,) = sweep_status(paths, validate=False).cells
        assert cell.reason == ("waits for 1 free GPU(s); held: none; ahead in line: bob's cell x1 of /s/other, "
                               "waiting for 1 GPU(s)")
        assert [w["runner_pid"] for w in json.loads(waiting.read_text())] == [other.pid, os.getpid()]
        runner._leave_line_if_idle([runner.q["cells"][0]])  # still a cell to start: keeps its place
        assert len(json.loads(waiting.read_text())) == 2
        runner._leave_line_if_idle([])  # its cell was cancelled
        assert [w["runner_pid"] for w in json.loads(waiting.read_text())] == [other.pid]
    finally:
        other.kill()
        other.wait()


def test_a_runner_that_cannot_go_on_fails_its_cells_where_status_looks(tmp_path, monkeypatch):
    """The runner died with a traceback in its own log and the cells read `missing`."""
    from orchestrator.status.state import sweep_status
    from orchestrator.submit.gpu_leases import LeaseError
    from orchestrator.submit.local import _Runner

    paths, queue = _queued_on_gpu_0(tmp_path, monkeypatch)
    (tmp_path / "leases" / "gpu-0.json").unlink()
    (tmp_path / "leases" / "gpu-0.json").mkdir()  # broken after submission
    with pytest.raises(LeaseError):
        _Runner(queue).run()
    (cell,) = sweep_status(paths, validate=False).cells
    assert cell.state == "failed" and cell.reason.startswith("the local runner stopped: LeaseError: ")


@dataclasses.dataclass(frozen=True)
class EarlyDeathTask(StandInTask):
    """Rank 1 dies before the ranks join (as a process the out-of-memory killer
    ends); rank 0 waits to join, as a real worker does, until it is stopped."""

    def __call__(self):
        import os
        import signal

        if os.environ.get("SUBMITIT_LOCAL_GLOBALID") == "1":
            os._exit(137)
        signal.signal(signal.SIGTERM, lambda *a: os._exit(143))  # the worker's stop_on_term
        while True:  # as rank 1 of a real cell waits for rank 0's address (dist.wait_for_address)
            time.sleep(0.1)


class EarlyDeathLauncher(StandInLauncher):
    task_class = EarlyDeathTask


@pytest.mark.slow
def test_a_rank_that_dies_before_the_join_stops_the_others(tmp_path, monkeypatch, by_value):
    """The other rank waited for it until the rendezvous timed out (600 s)."""
    from orchestrator.contracts import read_json

    monkeypatch.setenv("WATTSWEEP_GANG_GRACE_S", "2")
    paths, cells = _plan(tmp_path, monkeypatch, "shards=2")
    launcher = EarlyDeathLauncher({"max_parallel": 1, "timeout_min": 5})
    t0 = time.monotonic()
    launcher.wait(paths, launcher.submit(paths, cells))
    assert time.monotonic() - t0 < 25  # the grace, not the rendezvous timeout nor the kill wait
    failed = read_json(paths.failed_marker(cells[0].cell_id))
    assert failed["rank"] == 1 and failed["error"].startswith("rank 1 ended (killed? its log says how far it got)")
    assert "stopped them after 2 s" in failed["error"]
