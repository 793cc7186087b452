"""Reduce a sweep: validate each done cell, summarise it, compact its telemetry.

Cells are processed one at a time per worker process (parallel.py), so
memory holds a few cells' files, never the whole sweep.
Outputs are written in a fixed order with no timestamps: reducing twice gives
the same bytes.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.contracts import TELEMETRY_META_KEY, TELEMETRY_SCHEMA, SweepPaths, atomic_write_bytes
from orchestrator.reduce.files import write_derived
from orchestrator.reduce.metrics import CellTelemetry, request_metrics, telemetry_metrics
from orchestrator.reduce.parallel import ordered_map
from orchestrator.reduce.plan_io import PlanCell, read_plan_cells
from orchestrator.reduce.validate import (
    CellValidation, InvalidCell, StatKey, check_cell, load_cache, save_cache, stat_key,
)

S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
SUMMARY_SCHEMA = pa.schema(
    [
        ("cell_id", S), ("model", S), ("weights", S), ("dtype", S), ("kv_cache_dtype", S), ("gpu_kind", S),
        ("gpu_name", S),
        ("shards", I), ("nodes", I), ("batch_size", I), ("power_cap_w", F), ("dataset", S),
        ("n_prompts", I), ("max_new_tokens", I), ("seed", I), ("telemetry_source", S),
        ("n_responses", I), ("input_tokens", I), ("output_tokens", I), ("output_words", I),
        ("duration_s", F), ("tokens_per_s", F), ("words_per_s", F), ("responses_per_s", F),
        ("energy_j", F), ("energy_method", S), ("integrated_energy_j", F), ("cross_check_err_pct", F),
        ("mean_power_w", F), ("mean_power_per_gpu_w", F), ("energy_per_token_j", F), ("energy_per_response_j", F),
        ("sm_util_pct", F), ("mem_util_pct", F), ("mem_used_max_bytes", I), ("gpu_power_p99_w", F),
        ("power_limit_w", F), ("cap_binding", B), ("max_gap_s", F), ("sample_period_s", F),
        ("latency_p50_s", F), ("latency_p90_s", F), ("latency_p99_s", F), ("flags", S), ("slurm_job_id", S),
    ]
)
INVALID_CSV = "invalid.csv"
# Bump when a summary value's definition changes: cached rows of an older
# reducer are then recomputed rather than reused.
REDUCE_VERSION = "1:" + hashlib.sha256(",".join(SUMMARY_SCHEMA.names).encode()).hexdigest()[:8]
# Dictionary-encode only the repeated strings and keep statistics only where a
# reader filters (rank, time, phase): half the encode time of the defaults.
COMPACT_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "use_dictionary": ["host", "gpu_uuid", "phase", "source"],
    "write_statistics": ["rank", "timestamp_ns", "phase"],
}
TELEMETRY_DIR = "telemetry"
# The compacted telemetry drops cell_id: it is the partition key (directory name).
PARTITIONING_SCHEMA = pa.schema([("cell_id", pa.string())])


class ReduceError(Exception):
    """The sweep folder cannot be reduced at all (the message says why)."""


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    verdict: CellValidation
    row: dict[str, Any] | None


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def reduce_sweep(sweep_dir: str | Path, *, progress: bool = False) -> pa.Table:
    """Write results/summary.{parquet,csv}, results/invalid.csv and the compacted
    telemetry; return the summary (one row per done and valid cell)."""
    paths = SweepPaths.of(sweep_dir)
    if not paths.root.is_dir():
        raise ReduceError(f"no sweep folder at {paths.root}")
    plan = read_plan_cells(paths)
    done_ids = sorted(cid for cid in _cell_ids(paths, plan) if paths.done_marker(cid).exists())
    tdir = paths.results_dir / TELEMETRY_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    cache = load_cache(paths)
    done = _reduce_cells(paths, plan, cache, done_ids, tdir, progress)
    outcomes = [d.outcome for d in done]
    table = _summary_table([o.row for o in outcomes if o.row is not None])
    _write_outputs(paths, table, [o for o in outcomes if not o.verdict.ok], tdir)
    fresh = {d.outcome.cell_id: d for d in done if not d.reused and d.key is not None}
    if fresh:
        for cid, d in fresh.items():
            cache[cid] = {"key": d.key, "ok": d.outcome.verdict.ok, "reason": d.outcome.verdict.reason,
                          "reduced": REDUCE_VERSION, "row": d.outcome.row}
        save_cache(paths, cache)
    return table


@dataclass(frozen=True)
class CellDone:
    """What a worker hands back: the outcome, the stat key it was computed
    for (the cache key) and whether it came from the cache."""

    outcome: CellOutcome
    key: Any
    reused: bool


def _reuse(cid: str, hit: Any, key: Any, tdir: Path) -> CellOutcome | None:
    """The cached outcome when the cell's files are unchanged since the last
    reduce (same size and mtime of DONE.json and every file it lists, same
    reducer version) and, for a valid cell, its compacted partition exists."""
    if key is None or not isinstance(hit, dict) or hit.get("key") != key or hit.get("reduced") != REDUCE_VERSION:
        return None
    if not hit.get("ok"):
        return CellOutcome(cid, CellValidation(False, hit.get("reason")), None)
    if isinstance(hit.get("row"), dict) and (tdir / f"cell_id={cid}" / "part-0.parquet").exists():
        return CellOutcome(cid, CellValidation(True, None), hit["row"])
    return None


def open_telemetry(sweep_dir: str | Path):
    """The compacted telemetry as a pyarrow dataset (cell_id from the partition)."""
    import pyarrow.dataset as ds

    root = SweepPaths.of(sweep_dir).results_dir / TELEMETRY_DIR
    return ds.dataset(root, format="parquet", partitioning=ds.partitioning(PARTITIONING_SCHEMA, flavor="hive"))


def read_invalid(sweep_dir: str | Path) -> list[tuple[str, str]]:
    """(cell_id, reason) rows of results/invalid.csv; [] when absent."""
    p = SweepPaths.of(sweep_dir).results_dir / INVALID_CSV
    try:
        with open(p, newline="") as f:
            return [(r["cell_id"], r["reason"]) for r in csv.DictReader(f)]
    except OSError:
        return []


# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------


def _cell_ids(paths: SweepPaths, plan: dict[str, PlanCell]) -> set[str]:
    ids = set(plan)
    if paths.cells_dir.is_dir():
        ids.update(p.name for p in paths.cells_dir.iterdir() if p.is_dir())
    return ids


def _reduce_cells(paths: SweepPaths, plan: dict[str, PlanCell], cache: dict[str, Any], ids: list[str],
                  tdir: Path, progress: bool) -> list[CellDone]:
    out: list[CellDone] = []
    # Jobs are bare cell ids: the plan and the cache reach the workers once,
    # through the initializer (inherited memory under fork), not per cell.
    try:
        for i, o in enumerate(ordered_map(_reduce_job, ids, init=_init_job, initargs=(paths, tdir, plan, cache)), 1):
            out.append(o)
            if progress and (i % 100 == 0 or i == len(ids)):
                print(f"reduced {i}/{len(ids)} cells", file=sys.stderr, flush=True)
    finally:
        _JOB.clear()  # a small sweep runs here, not in workers: drop its plan and cache
    return out


_JOB: dict[str, Any] = {}


def _init_job(paths: SweepPaths, tdir: Path, plan: dict[str, PlanCell], cache: dict[str, Any]) -> None:
    _JOB.update(paths=paths, tdir=tdir, plan=plan, cache=cache)


def _reduce_job(cid: str) -> CellDone:
    paths, tdir, hit = _JOB["paths"], _JOB["tdir"], _JOB["cache"].get(cid)
    if hit is not None:
        # Stat before reading: a file changed meanwhile gets a new key next time.
        cached = _reuse(cid, hit, stat_key(paths, cid), tdir)
        if cached is not None:
            return CellDone(cached, hit["key"], True)
    return reduce_cell(paths, cid, _JOB["plan"].get(cid), tdir)


def reduce_cell(paths: SweepPaths, cell_id: str, plan_cell: PlanCell | None, tdir: Path) -> CellDone:
    """Validate one cell and, if valid, summarise it and write its compacted telemetry."""
    params = plan_cell.params if plan_cell else {}
    key = StatKey()
    try:
        done, files = check_cell(paths, cell_id, int(params["shards"]) if "shards" in params else None,
                                 keep_data=True, key=key)
        cell, requests = _read_tables(files)
        row = _cell_row(cell_id, params, plan_cell, done, cell, requests)
        _write_compacted(tdir, cell_id, cell)
    except InvalidCell as e:
        outcome = CellOutcome(cell_id, CellValidation(False, str(e)), None)
    else:
        outcome = CellOutcome(cell_id, CellValidation(True, None), row)
    return CellDone(outcome, key.value(paths.cell_dir(cell_id)), False)


def _read_tables(files) -> tuple[CellTelemetry, pa.Table]:
    tel = sorted((f for f in files if f.kind == "telemetry"), key=lambda f: f.rank)
    tables = [_read_telemetry(f) for f in tel]
    requests = pa.concat_tables([_read(f, None) for f in files if f.kind == "requests"])
    return CellTelemetry.of(tables, [f.rank for f in tel], [f.meta for f in tel]), requests


# cell_id is not decoded: validation proved every row holds this cell, and in
# the compacted files it is the partition key.
_TELEMETRY_COLUMNS = [i for i, f in enumerate(TELEMETRY_SCHEMA) if f.name != "cell_id"]


def _read_telemetry(f) -> pa.Table:
    return _read(f, _TELEMETRY_COLUMNS)


def _read(f, columns: list[int] | None) -> pa.Table:
    try:
        return f.pf.read(columns)
    except Exception as e:  # noqa: BLE001 - corrupt pages behind a valid footer
        raise InvalidCell(f"unreadable data in {f.rel} ({type(e).__name__})") from None


def _cell_row(cell_id: str, params: dict[str, Any], plan_cell: PlanCell | None, done: dict[str, Any],
              cell: CellTelemetry, requests: pa.Table) -> dict[str, Any]:
    shards = int(done.get("world_size") or params.get("shards") or len(cell.ranks))
    cap = params.get("power_cap_w")
    try:
        tm = telemetry_metrics(cell, shards, None if cap is None else float(cap))
        rm = request_metrics(requests, tm["duration_s"], tm["energy_j"])
    except (ValueError, TypeError, KeyError, ZeroDivisionError, pa.ArrowException) as e:
        raise InvalidCell(f"cannot compute metrics: {type(e).__name__}: {e}") from None
    if rm["output_tokens"] <= 0:
        raise InvalidCell("requests file holds no output tokens")
    slurm = done.get("slurm") if isinstance(done.get("slurm"), dict) else {}
    return {
        "cell_id": cell_id,
        "model": params.get("model"),
        "weights": done.get("weights", params.get("weights")),
        "dtype": params.get("dtype"),
        "kv_cache_dtype": params.get("kv_cache_dtype"),
        "gpu_kind": params.get("gpu_kind"),
        "gpu_name": done.get("gpu_name") or cell.metas[0].get("gpu_name"),
        "shards": shards,
        "nodes": int(done.get("nodes") or (plan_cell.nodes if plan_cell and plan_cell.nodes else 1)),
        "batch_size": params.get("batch_size"),
        "power_cap_w": cap,
        "dataset": params.get("dataset"),
        "n_prompts": params.get("n_prompts"),
        "max_new_tokens": params.get("max_new_tokens"),
        "seed": params.get("seed"),
        "telemetry_source": done.get("telemetry_source") or _sources(cell),
        "slurm_job_id": None if slurm.get("job_id") is None else str(slurm.get("job_id")),
        **tm,
        **rm,
    }


def _sources(cell: CellTelemetry) -> str:
    names = {v for v in cell.table.column("source").unique().to_pylist() if v}
    return "+".join(sorted(names)) or "unknown"


def _write_compacted(tdir: Path, cell_id: str, cell: CellTelemetry) -> None:
    table = cell.table
    meta = json.dumps({"ranks": [{"rank": r, **m} for r, m in zip(cell.ranks, cell.metas)]}, sort_keys=True)
    table = table.replace_schema_metadata({TELEMETRY_META_KEY: meta.encode()})
    # An Arrow buffer, not io.BytesIO: the writer then appends in C++ rather
    # than calling back into Python for every page.
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **COMPACT_OPTIONS)
    # No fsync: the compacted copy is derived data that a rerun of reduce
    # rebuilds, and an fsync per cell cost more than writing it.
    write_derived(f"{tdir}/cell_id={cell_id}", "part-0.parquet", sink.getvalue())


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

_SORT_KEYS = ("model", "gpu_kind", "shards", "batch_size", "power_cap_w", "dataset", "cell_id")


def _summary_table(rows: list[dict[str, Any]]) -> pa.Table:
    def key(r: dict[str, Any]) -> tuple:
        # None sorts first (the uncapped run before its caps).
        return tuple((r.get(k) is not None, r.get(k) if r.get(k) is not None else 0) for k in _SORT_KEYS)

    rows = sorted(rows, key=key)
    cols = {f.name: [r.get(f.name) for r in rows] for f in SUMMARY_SCHEMA}
    return pa.table(cols, schema=SUMMARY_SCHEMA)


def _write_outputs(paths: SweepPaths, table: pa.Table, invalid: list[CellOutcome], tdir: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy")
    atomic_write_bytes(paths.summary_parquet, buf.getvalue())
    cbuf = io.BytesIO()
    pacsv.write_csv(table, cbuf)
    atomic_write_bytes(paths.summary_csv, cbuf.getvalue())
    sio = io.StringIO()
    w = csv.writer(sio, lineterminator="\n")
    w.writerow(["cell_id", "reason"])
    for o in sorted(invalid, key=lambda o: o.cell_id):
        w.writerow([o.cell_id, o.verdict.reason])
    atomic_write_bytes(paths.results_dir / INVALID_CSV, sio.getvalue().encode())
    _drop_stale_partitions(tdir, set(table.column("cell_id").to_pylist()))


def _drop_stale_partitions(tdir: Path, keep: set[str]) -> None:
    """A cell that turned invalid (or was moved aside) must not stay in the compacted data."""
    for p in tdir.iterdir():
        if p.is_dir() and p.name.startswith("cell_id=") and p.name[len("cell_id="):] not in keep:
            shutil.rmtree(p, ignore_errors=True)
