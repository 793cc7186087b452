"""Planned cells that have no result: what `reduce` and `report` must mention.

A summary counts only the cells that finished; without this, a sweep whose
shards=2 cell failed reads as a sweep that never planned shards=2. Read from
the sweep folder alone (plan.jsonl and the cells' DONE.json / FAILED.json),
never from Slurm: `reduce` and `report` must work where Slurm cannot be asked.
Which state each such cell is in (pending, running, cancelled, ...) needs the
queue: `wattsweep status` says, and the line below points there.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.contracts import DONE_NAME, FAILED_NAME, SweepPaths
from orchestrator.reduce.plan_io import PlanCell, read_plan_cells

# The states a feasible cell without DONE.json can be in (status/state.py;
# unknown: Slurm could not be asked): the filter that lists exactly them.
NO_RESULT_STATES = "failed,cancelled,timeout,missing,planned,pending,running,unknown"


@dataclass(frozen=True)
class Coverage:
    """Of the feasible planned cells, those without a DONE.json."""

    sweep_dir: str
    planned: int  # feasible cells of the plan
    no_result: tuple[str, ...]  # their ids, in plan order
    with_failed_marker: int  # of no_result, those whose FAILED.json is there (and not cancelled)
    cancelled: int = 0  # of no_result, those whose latest job `wattsweep cancel` stopped

    def message(self) -> str | None:
        """One line for `reduce` and the report; None when every planned cell has a result."""
        n = len(self.no_result)
        if not n:
            return None
        others = n - self.with_failed_marker - self.cancelled
        parts = []
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        if self.with_failed_marker:
            parts.append(f"{self.with_failed_marker} failed (FAILED.json)")
        if others:
            parts.append(f"{others} with no marker: timed out, pending, running or never run")
        return (f"{n} of {self.planned} planned cells {'has' if n == 1 else 'have'} no result yet ({'; '.join(parts)}); "
                f"`wattsweep status {shlex.quote(self.sweep_dir)} --state {NO_RESULT_STATES}` lists them")


def coverage(sweep_dir: str | Path, plan: dict[str, PlanCell] | None = None) -> Coverage:
    """Count the feasible planned cells without DONE.json (one stat per planned
    cell, a second one only for those without it)."""
    paths = SweepPaths.of(sweep_dir)
    if plan is None:
        plan = read_plan_cells(paths)
    cells = str(paths.cells_dir)
    feasible = [cid for cid, c in plan.items() if c.feasible]
    # Plain os calls on strings, as summary._done_ids: pathlib costs several times as much per cell.
    missing = tuple(cid for cid in feasible if not os.path.exists(f"{cells}/{cid}/{DONE_NAME}"))
    cancelled = _cancelled(paths, missing)
    failed = sum(os.path.exists(f"{cells}/{cid}/{FAILED_NAME}") for cid in missing if cid not in cancelled)
    return Coverage(str(sweep_dir), len(feasible), missing, failed, len(cancelled))


def _cancelled(paths: SweepPaths, ids: tuple[str, ...]) -> set[str]:
    """Of ``ids``, the cells whose latest job `wattsweep cancel` recorded stopping."""
    from orchestrator.submit.cancellations import cancelled_latest

    return set(cancelled_latest(paths)).intersection(ids) if ids else set()



def planned_params(plan: dict[str, PlanCell]) -> list[dict[str, Any]]:
    """Parameters of the feasible planned cells: what a figure could have drawn."""
    return [c.params for c in plan.values() if c.feasible and c.params]
