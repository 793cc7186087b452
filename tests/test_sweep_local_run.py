"""The local launcher runs cells through submitit's local executor, detached."""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from orchestrator.config import compose_cells
from orchestrator.contracts import CellTask, SweepPaths, write_done
from orchestrator.plan import plan_cells
from orchestrator.submit.base import make_task, read_submissions
from orchestrator.submit.local import LocalLauncher, local_queue_states


@dataclasses.dataclass(frozen=True)
class StandInTask(CellTask):
    """Stands in for the worker: joins the ranks with gloo through submitit's
    job environment, all-reduces the ranks, rank 0 writes DONE.json."""

    def __call__(self):
        import torch
        import torch.distributed as dist
        from submitit.helpers import TorchDistributedEnvironment

        env = TorchDistributedEnvironment().export()
        dist.init_process_group("gloo", init_method="env://", rank=env.rank, world_size=env.world_size)
        total = torch.tensor([env.rank + 1])
        dist.all_reduce(total)
        paths = SweepPaths.of(self.sweep_dir)
        out = paths.cell_dir(self.cell_id) / f"standin-rank-{env.rank}.json"
        out.write_text(json.dumps({"rank": env.rank, "world": env.world_size, "sum": int(total), "attempt": self.attempt}))
        dist.barrier()
        if self.options.sleep_s:
            time.sleep(self.options.sleep_s)
        if env.rank == 0:
            write_done(paths, self.cell_id, {}, {"stand_in": True})
        dist.destroy_process_group()
        return env.rank


class StandInLauncher(LocalLauncher):
    def _stage(self, paths, cell):
        entry = super()._stage(paths, cell)
        task = make_task(paths, cell, entry["attempt"])
        with open(entry["task"], "wb") as f:
            cloudpickle.dump(StandInTask(**{f.name: getattr(task, f.name) for f in dataclasses.fields(task)}), f)
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
