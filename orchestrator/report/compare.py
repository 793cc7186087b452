"""Side-by-side ratios of matching cells of two sweeps (B / A).

Cells match when the chosen parameters are equal. By default that is every
measurement parameter except ``gpu_kind`` (H100 against H200); to compare caps
within or across sweeps, leave out ``power_cap_w`` instead.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from orchestrator.contracts import CellParams, SweepPaths, canonical_json
from orchestrator.reduce.plan_io import read_plan_cells
from orchestrator.report.data import Row, is_simulated, load_summary, sort_key

PARAM_NAMES = tuple(f.name for f in dataclasses.fields(CellParams))
DEFAULT_IGNORE = ("gpu_kind",)
DEFAULT_METRICS = ("tokens_per_s", "words_per_s", "energy_per_token_j", "energy_per_response_j", "mean_power_w", "latency_p50_s")


class CompareError(Exception):
    """The sweeps cannot be compared as asked (the message says why)."""


def match_keys(match_on: Sequence[str] | None = None, ignore: Sequence[str] | None = None) -> tuple[str, ...]:
    keys = tuple(match_on) if match_on else tuple(k for k in PARAM_NAMES if k not in (ignore or DEFAULT_IGNORE))
    unknown = [k for k in keys if k not in PARAM_NAMES]
    if unknown:
        raise CompareError(f"unknown match key {unknown[0]!r}; valid: {', '.join(PARAM_NAMES)}")
    return keys


def compare_sweeps(sweep_a: str | Path, sweep_b: str | Path, *, match_on: Sequence[str] | None = None,
                   ignore: Sequence[str] | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                   where_a: dict[str, Any] | None = None, where_b: dict[str, Any] | None = None) -> pa.Table:
    """One row per matched pair: the match keys that vary, then per metric A, B and B/A.

    ``where_a``/``where_b`` keep only the cells of that side whose parameters
    equal the given values: one sweep against itself, one cap against another.
    """
    keys = match_keys(match_on, ignore)
    for where in (where_a, where_b):
        match_keys(list(where or {}) or None)  # unknown parameter names are errors
    a, b = _indexed(sweep_a, keys, "A", where_a), _indexed(sweep_b, keys, "B", where_b)
    common = sorted(set(a) & set(b), key=lambda k: tuple(sort_key(_show(v)) for v in k))
    if not common:
        raise CompareError(f"no matching cells: {len(a)} in A, {len(b)} in B match on none of ({', '.join(keys)})")
    shown = [k for i, k in enumerate(keys) if len({c[i] for c in common}) > 1] or list(keys[:1])
    cols: dict[str, list[Any]] = {k: [] for k in shown}
    cols["cell_a"], cols["cell_b"] = [], []
    for m in metrics:
        cols[f"{m}_a"], cols[f"{m}_b"], cols[f"{m}_ratio"] = [], [], []
    for key in common:
        ra, rb = a[key], b[key]
        for k in shown:
            cols[k].append(_show(key[keys.index(k)]))
        cols["cell_a"].append(ra["cell_id"])
        cols["cell_b"].append(rb["cell_id"])
        for m in metrics:
            va, vb = ra.get(m), rb.get(m)
            cols[f"{m}_a"].append(va)
            cols[f"{m}_b"].append(vb)
            cols[f"{m}_ratio"].append(float(vb) / float(va) if va not in (None, 0) and vb is not None else None)
    table = pa.table({k: pa.array(v, type=_type_of(v)) for k, v in cols.items()})
    simulated = [name for name, rows in (("A", a.values()), ("B", b.values())) if is_simulated(rows)]
    meta = {"match_on": ",".join(keys), "simulated": ",".join(simulated)}
    return table.replace_schema_metadata(meta)


def _indexed(sweep: str | Path, keys: Sequence[str], side: str, where: dict[str, Any] | None) -> dict[tuple, Row]:
    rows = load_summary(sweep)
    unknown = [m for m in DEFAULT_METRICS if rows and m not in rows[0]]
    if unknown:
        raise CompareError(f"summary of {side} lacks {unknown[0]}; run `wattsweep reduce {sweep}` again")
    plan = read_plan_cells(SweepPaths.of(sweep))
    out: dict[tuple, Row] = {}
    for r in rows:
        params = plan[r["cell_id"]].params if r["cell_id"] in plan else r
        if where and any(canonical_json(params.get(k)) != canonical_json(v) for k, v in where.items()):
            continue
        key = tuple(canonical_json(params.get(k)) for k in keys)
        if key in out:
            raise CompareError(
                f"cells {out[key]['cell_id']} and {r['cell_id']} of {side} match on the same keys; "
                f"add keys with --match-on (now: {', '.join(keys)})")
        out[key] = r
    return out


def parse_where(items: Sequence[str]) -> dict[str, Any]:
    """["power_cap_w=150", "dataset=alpaca"] -> {"power_cap_w": 150, "dataset": "alpaca"} (JSON values, else text)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CompareError(f"filter {item!r} is not KEY=VALUE (e.g. power_cap_w=150 or power_cap_w=null)")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def _show(v: str) -> Any:
    """Match keys are canonical JSON; show them as values."""
    import json

    try:
        out = json.loads(v)
    except (TypeError, ValueError):
        return v
    return v if isinstance(out, (dict, list)) else out


def _type_of(values: list[Any]) -> pa.DataType | None:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.float64() if any(isinstance(v, float) for v in present) else pa.int64()
    if present and all(isinstance(v, str) for v in present):
        return pa.string()
    if not present:
        return pa.null()
    return pa.string() if not all(isinstance(v, (dict, list)) for v in present) else None
