"""A tolerant reader of plan.jsonl for the reducer.

The reducer needs only each cell's id, params and node count. It reads the
lines itself (rather than through the planner's dataclasses) so that a sweep
written by an older or newer planner still reduces; a damaged line is skipped
and counted, never fatal. The commands (reduce, report, compare) first check
the plan with ``require_plan``, which refuses a damaged one as ``status`` does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.contracts import LATER_PARAM_DEFAULTS, SweepPaths
from orchestrator.plan.planned import PlanFileError, read_plan


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


def require_plan(paths: SweepPaths) -> dict[str, PlanCell]:
    """cell id -> PlanCell, read by the planner's own reader (as `status` reads it);
    PlanFileError, naming the file and line, for a missing, damaged or empty plan:
    a command must not reduce or pair cells whose parameters it had to guess."""
    if not paths.root.is_dir():
        raise PlanFileError(f"no sweep folder at {paths.root}")
    try:
        cells = read_plan(paths)
    except OSError as e:
        raise PlanFileError(f"{paths.plan_jsonl}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise PlanFileError(f"{paths.plan_jsonl}: not UTF-8 text") from None
    if not cells:  # a sweep always plans at least one cell: this plan was cut short
        raise PlanFileError(f"{paths.plan_jsonl}: the plan lists no cells; "
                            f"is {paths.root} a sweep folder made by `wattsweep sweep`?")
    return {c.cell_id: PlanCell(c.cell_id, c.params.to_dict(), c.nodes, c.feasible) for c in cells}


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
