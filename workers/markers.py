"""A cell's DONE.json and FAILED.json as one run of one attempt sees them.

A job requeued after preemption runs the same attempt again, and the marker
its first run wrote on the way out (submitit's requeue exits through the
worker's failure path) stays until rank 0 moves it aside after the join.
Judged by attempt alone, it stopped the requeued run's ranks. So a worker's
FAILED.json names its run (``run``: the job and its restart count,
dist.job_key), and only this run's marker counts; the local runner's marker
has no ``run`` and is of the run it stopped.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from orchestrator.contracts import CellTask, SweepPaths, move_aside_outputs, read_json, write_failed


@functools.lru_cache(maxsize=1)
def run_id() -> str:
    """This run of the attempt (constant for the process)."""
    from workers import dist

    return dist.job_key()


def _this_runs(path: Path, task: CellTask) -> dict[str, Any] | None:
    if not path.exists():  # one stat, the common case (polled by the join and the peer watch)
        return None
    try:
        marker = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("attempt") != task.attempt:
        return None
    run = marker.get("run")
    return marker if run is None or run == run_id() else None


def this_runs_failure(paths: SweepPaths, task: CellTask) -> dict[str, Any] | None:
    return _this_runs(paths.failed_marker(task.cell_id), task)


def done_this_run(paths: SweepPaths, task: CellTask) -> bool:
    return _this_runs(paths.done_marker(task.cell_id), task) is not None


def failure_reason(paths: SweepPaths, task: CellTask) -> str | None:
    """Why this run already failed ("rank 1: ..."), for a rank that waits to join."""
    failed = this_runs_failure(paths, task)
    if failed is None:
        return None
    return f"rank {failed.get('rank', '?')}: {str(failed.get('error', ''))[:200]}"


def failed_by_another(paths: SweepPaths, task: CellTask, rank: int) -> bool:
    """This run's FAILED.json, written by another rank (or the runner): not our
    own, which this rank writes on its way out."""
    failed = this_runs_failure(paths, task)
    return failed is not None and failed.get("found_by_rank", failed.get("rank")) != rank


def write_failure(paths: SweepPaths, task: CellTask, rank: int, *, error: str, traceback_text: str,
                  **more: Any) -> None:
    """FAILED.json of this run, naming ``rank``. A marker of an earlier run or
    attempt that rank 0 has not moved aside yet goes to ``attempts/`` first,
    as rank 0 would have moved it: never overwritten."""
    if paths.failed_marker(task.cell_id).exists() and this_runs_failure(paths, task) is None:
        try:
            move_aside_outputs(paths, task.cell_id)
        except OSError:
            pass  # another rank moved it just now
    write_failed(paths, task.cell_id, error=error, traceback_text=traceback_text,
                 extra={"rank": rank, "attempt": task.attempt, "run": run_id(), **more})
