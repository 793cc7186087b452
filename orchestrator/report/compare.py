"""Side-by-side ratios of matching cells of two sweeps (B / A).

Cells match when the chosen parameters are equal. By default that is every
measurement parameter except ``gpu_kind`` (H100 against H200); to compare caps
within or across sweeps, leave out ``power_cap_w`` as well.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from orchestrator.contracts import CellParams, SweepPaths, canonical_json
from orchestrator.reduce.plan_io import require_plan
from orchestrator.reduce.summary import SUMMARY_SCHEMA
from orchestrator.submit.shell import quoted
from orchestrator.report.data import Row, flags_note, flags_of, is_simulated, load_summary, sort_key

PARAM_NAMES = tuple(f.name for f in dataclasses.fields(CellParams))
DEFAULT_IGNORE = ("gpu_kind",)
DEFAULT_METRICS = ("tokens_per_s", "words_per_s", "energy_per_token_j", "energy_per_response_j", "mean_power_w", "latency_p50_s")
# A ratio B/A needs numbers: the numeric columns of the summary.
METRIC_NAMES = tuple(f.name for f in SUMMARY_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))


class CompareError(Exception):
    """The sweeps cannot be compared as asked (the message says why)."""


@dataclass(frozen=True)
class _Side:
    name: str  # "A" or "B"
    sweep: str
    cells: list[tuple[dict[str, Any], Row]]  # (parameters, summary row) of every reduced cell
    where: dict[str, Any]
    index: dict[tuple, Row]  # match key -> row, of the cells ``where`` keeps


def match_keys(match_on: Sequence[str] | None = None, ignore: Sequence[str] | None = None) -> tuple[str, ...]:
    """``match_on`` exactly, else every parameter but gpu_kind and ``ignore``
    (which adds to the default: comparing caps must not start pairing by card)."""
    _known(match_on or (), PARAM_NAMES, "match key")
    _known(ignore or (), PARAM_NAMES, "key to ignore")
    if match_on:
        return tuple(match_on)
    left_out = set(DEFAULT_IGNORE) | set(ignore or ())
    return tuple(k for k in PARAM_NAMES if k not in left_out)


def _known(names: Sequence[str], valid: Sequence[str], what: str) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise CompareError(f"unknown {what} {unknown[0]!r}; valid: {', '.join(valid)}")


def compare_sweeps(sweep_a: str | Path, sweep_b: str | Path, *, match_on: Sequence[str] | None = None,
                   ignore: Sequence[str] | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                   where_a: dict[str, Any] | None = None, where_b: dict[str, Any] | None = None) -> pa.Table:
    """One row per matched pair: the match keys that vary, then per metric A, B and B/A.

    ``where_a``/``where_b`` keep only the cells of that side whose parameters
    equal the given values: one sweep against itself, one cap against another.
    The schema metadata says what was matched on, how many cells of each
    side found no partner and (``flags_note``) which flags the paired cells carry;
    the ``flags`` column holds the flags of either cell of a pair.
    """
    keys = match_keys(match_on, ignore)
    _known(metrics, METRIC_NAMES, "metric")
    for where in (where_a, where_b):
        _known(list(where or {}), PARAM_NAMES, "filter key")
    a = _side("A", sweep_a, keys, metrics, where_a or {})
    b = _side("B", sweep_b, keys, metrics, where_b or {})
    common = sorted(set(a.index) & set(b.index), key=lambda k: tuple(sort_key(_show(v)) for v in k))
    if not common:
        raise CompareError(f"no matching cells: {_why_none(a, b, keys, bool(match_on))}")
    shown = [k for i, k in enumerate(keys) if len({c[i] for c in common}) > 1] or list(keys[:1])
    cols: dict[str, list[Any]] = {k: [] for k in shown}
    cols["cell_a"], cols["cell_b"], cols["flags"] = [], [], []
    paired: dict[tuple[str, str], Row] = {}  # (sweep, cell) -> row: each cell counted once in the caveat
    for m in metrics:
        cols[f"{m}_a"], cols[f"{m}_b"], cols[f"{m}_ratio"] = [], [], []
    for key in common:
        ra, rb = a.index[key], b.index[key]
        for k in shown:
            cols[k].append(_show(key[keys.index(k)]))
        cols["cell_a"].append(ra["cell_id"])
        cols["cell_b"].append(rb["cell_id"])
        # A ratio is only as sound as both of its cells: show the flags of either.
        cols["flags"].append(",".join(sorted(flags_of(ra) | flags_of(rb))))
        paired.update({(a.sweep, ra["cell_id"]): ra, (b.sweep, rb["cell_id"]): rb})
        for m in metrics:
            va, vb = ra.get(m), rb.get(m)
            cols[f"{m}_a"].append(va)
            cols[f"{m}_b"].append(vb)
            cols[f"{m}_ratio"].append(float(vb) / float(va) if va not in (None, 0) and vb is not None else None)
    table = pa.table({k: pa.array(v, type=_type_of(v)) for k, v in cols.items()})
    simulated = [s.name for s in (a, b) if is_simulated(s.index.values())]
    meta = {"match_on": ",".join(keys), "simulated": ",".join(simulated),
            "unmatched_a": str(len(a.index) - len(common)), "unmatched_b": str(len(b.index) - len(common)),
            "flags_note": flags_note(list(paired.values()), "paired cells") or ""}
    return table.replace_schema_metadata(meta)


def _side(name: str, sweep: str | Path, keys: Sequence[str], metrics: Sequence[str], where: dict[str, Any]) -> _Side:
    # The plan first: load_summary may reduce, which must not happen in a folder
    # that is no sweep, and a damaged plan would pair cells on guessed parameters.
    plan = require_plan(SweepPaths.of(sweep))
    rows = load_summary(sweep)
    missing = [m for m in metrics if rows and m not in rows[0]]
    if missing:
        raise CompareError(f"summary of {name} lacks {missing[0]}; run `wattsweep reduce {quoted(sweep)}` again")
    cells = [(plan[r["cell_id"]].params if r["cell_id"] in plan else r, r) for r in rows]
    return _Side(name, str(sweep), cells, where, _indexed(cells, keys, name, where))


def _indexed(cells: list[tuple[dict[str, Any], Row]], keys: Sequence[str], side: str,
             where: dict[str, Any]) -> dict[tuple, Row]:
    out: dict[tuple, Row] = {}
    for params, r in cells:
        if any(canonical_json(params.get(k)) != canonical_json(v) for k, v in where.items()):
            continue
        key = tuple(canonical_json(params.get(k)) for k in keys)
        if key in out:
            raise CompareError(
                f"cells {out[key]['cell_id']} and {r['cell_id']} of {side} match on the same keys; "
                f"add keys with --match-on (now: {', '.join(keys)})")
        out[key] = r
    return out


def _why_none(a: _Side, b: _Side, keys: Sequence[str], by_match_on: bool) -> str:
    """Why no cell of A found a partner in B, in one line: an empty side (and the
    filter that emptied it), else the keys on which A and B share no value."""
    for s in (a, b):
        if not s.index:
            return _why_empty(s)
    values = {k: ({key[i] for key in a.index}, {key[i] for key in b.index}) for i, k in enumerate(keys)}
    apart = [k for k, (va, vb) in values.items() if not va & vb]
    if not apart:
        varying = [k for k, (va, vb) in values.items() if len(va | vb) > 1]
        return (f"every value of each key occurs in both, but no cell of B has the combination of "
                f"{', '.join(varying)} of a cell of A")
    why = "; ".join(f"no cell of B has {_kv(k, values[k][0])} as in A; B has {_kv(k, values[k][1])}" for k in apart)
    fix = f"leave {','.join(apart)} out of --match-on" if by_match_on else f"pass --ignore {','.join(apart)} to pair them"
    return f"{why}; {fix}"


def _why_empty(s: _Side) -> str:
    if not s.cells:
        return f"{s.name} has no done cells with valid outputs; see `wattsweep status {quoted(s.sweep)}`"
    flag = f"--where-{s.name.lower()}"
    filt = " ".join(f"{flag} {k}={_text(canonical_json(v))}" for k, v in s.where.items())
    has = " and ".join(_kv(k, {canonical_json(p.get(k)) for p, _ in s.cells}) for k in s.where)
    return f"the filter {filt} leaves none of the {len(s.cells)} cells of {s.name}; {s.name} has {has}"


def _kv(key: str, values: set[str]) -> str:
    """n_prompts=8,16 from canonical JSON values, in the --where spelling."""
    return f"{key}=" + ",".join(_text(v) for v in sorted(values, key=lambda v: sort_key(_show(v))))


def _text(v: str) -> str:
    """A canonical JSON value as typed on the command line: text unquoted, None as null."""
    shown = _show(v)
    return shown if isinstance(shown, str) else v


def parse_where(items: Sequence[str]) -> dict[str, Any]:
    """["power_cap_w=150", "dataset=alpaca"] -> {"power_cap_w": 150, "dataset": "alpaca"} (JSON values, else text)."""
    from orchestrator.cli import key_values

    try:
        return key_values(items, "power_cap_w=150 or power_cap_w=null")
    except ValueError as e:
        raise CompareError(f"filter {e}") from None


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
