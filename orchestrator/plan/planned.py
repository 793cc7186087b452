"""A planned cell and the plan file (``plan.jsonl``).

One JSON object per line: ``id, params, options, launcher, nodes, feasible, reason``.
Kept free of Hydra and torch so that ``status`` and ``resubmit`` read plans fast.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from orchestrator.contracts import CellParams, RunOptions, SweepPaths, atomic_write_bytes


class PlanFileError(ValueError):
    """plan.jsonl is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class PlannedCell:
    cell_id: str
    params: CellParams
    options: RunOptions
    launcher: Mapping[str, Any] = field(default_factory=dict)  # resolved launcher config (name + fields)
    nodes: int = 1
    feasible: bool = True
    reason: str | None = None  # why not feasible (None when feasible)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.cell_id,
            "params": self.params.to_dict(),
            "options": self.options.to_dict(),
            "launcher": dict(self.launcher),
            "nodes": self.nodes,
            "feasible": self.feasible,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PlannedCell":
        params = CellParams.from_dict(d["params"])
        cell_id = str(d["id"])
        if params.cell_id != cell_id:
            raise ValueError(f"id {cell_id} does not match its params (their hash is {params.cell_id})")
        return cls(
            cell_id=cell_id,
            params=params,
            options=RunOptions.from_dict(d.get("options") or {}),
            launcher=dict(d.get("launcher") or {}),
            nodes=int(d.get("nodes", 1)),
            feasible=bool(d["feasible"]),
            reason=d.get("reason"),
        )


def write_plan(paths: SweepPaths, cells: Iterable[PlannedCell]) -> Path:
    """Write plan.jsonl atomically, one cell per line."""
    lines = [json.dumps(c.to_dict(), sort_keys=True, default=str) for c in cells]
    atomic_write_bytes(paths.plan_jsonl, ("\n".join(lines) + ("\n" if lines else "")).encode())
    return paths.plan_jsonl


def read_plan(paths: SweepPaths) -> list[PlannedCell]:
    """Read plan.jsonl; a malformed line raises PlanFileError naming file and line."""
    path = paths.plan_jsonl
    if not path.exists():
        raise PlanFileError(f"{path}: no plan file; is {paths.root} a sweep folder made by `wattsweep sweep`?")
    cells: list[PlannedCell] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                cells.append(PlannedCell.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
                raise PlanFileError(f"{path}:{lineno}: malformed plan line ({msg})") from None
    return cells
