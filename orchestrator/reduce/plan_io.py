"""A tolerant reader of plan.jsonl for the reducer.

The reducer needs only each cell's id, params and node count. It reads the
lines itself (rather than through the planner's dataclasses) so that a sweep
written by an older or newer planner still reduces; a damaged line is skipped
and counted, never fatal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.contracts import LATER_PARAM_DEFAULTS, SweepPaths


@dataclass(frozen=True)
class PlanCell:
    cell_id: str
    params: dict[str, Any] = field(default_factory=dict)
    nodes: int | None = None
    feasible: bool = True


def read_plan_cells(paths: SweepPaths) -> dict[str, PlanCell]:
    """cell id -> PlanCell, in file order; {} when there is no plan."""
    out: dict[str, PlanCell] = {}
    try:
        text = paths.plan_jsonl.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        cell = _parse_line(line)
        if cell is not None:
            out[cell.cell_id] = cell
    return out


def _parse_line(line: str) -> PlanCell | None:
    line = line.strip()
    if not line:
        return None
    try:
        d = json.loads(line)
    except ValueError:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("id"), str):
        return None
    params = d.get("params") if isinstance(d.get("params"), dict) else {}
    if params:  # a plan written before a later parameter reads as if it had it
        params = {**LATER_PARAM_DEFAULTS, **params}
    nodes = d.get("nodes")
    return PlanCell(d["id"], dict(params), int(nodes) if isinstance(nodes, int) else None, bool(d.get("feasible", True)))
