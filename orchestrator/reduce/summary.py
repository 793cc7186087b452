"""Reduce a sweep: validate each done cell, summarise it, compact its telemetry.

Cells are processed one at a time per worker process (parallel.py; the work
of one cell is cell.py), so memory holds a few cells' files, never the whole
sweep.
Outputs are written in a fixed order with no timestamps: reducing twice gives
the same bytes.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import io
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.contracts import DONE_NAME, SweepPaths, atomic_write_bytes
from orchestrator.reduce.cache import load_cache, save_cache, stat_key
from orchestrator.reduce.cell import PART_NAME, CellDone, CellOutcome, partition_dir, reduce_cell
from orchestrator.reduce.parallel import ordered_map
from orchestrator.reduce.plan_io import PlanCell, read_plan_cells
from orchestrator.reduce.validate import CellValidation

S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
SUMMARY_SCHEMA = pa.schema(
    [
        ("cell_id", S), ("model", S), ("weights", S), ("dtype", S), ("kv_cache_dtype", S), ("gpu_kind", S),
        ("gpu_name", S),
        ("shards", I), ("nodes", I), ("batch_size", I), ("power_cap_w", F), ("dataset", S),
        ("n_prompts", I), ("max_new_tokens", I), ("seed", I), ("telemetry_source", S),
        ("n_responses", I), ("prompts_truncated", I), ("input_tokens", I), ("output_tokens", I), ("output_words", I),
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
# reducer are then recomputed rather than reused. 4: cap_binding also from the
# p99 power; slurm_job_id names the array task (ARRAY_TASK).
REDUCE_VERSION = "5:" + hashlib.sha256(",".join(SUMMARY_SCHEMA.names).encode()).hexdigest()[:8]
TELEMETRY_DIR = "telemetry"
# The compacted telemetry drops cell_id: it is the partition key (directory name).
PARTITIONING_SCHEMA = pa.schema([("cell_id", pa.string())])


class ReduceError(Exception):
    """The sweep folder cannot be reduced at all (the message says why)."""


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def reduce_sweep(sweep_dir: str | Path, *, progress: bool = False) -> pa.Table:
    """Write results/summary.{parquet,csv}, results/invalid.csv and the compacted
    telemetry; return the summary (one row per done and valid cell)."""
    paths = SweepPaths.of(sweep_dir)
    if not paths.root.is_dir():
        raise ReduceError(f"no sweep folder at {paths.root}")
    with _frozen_heap():
        return _reduce(paths, progress)


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Objects alive now (modules, pyarrow, numpy) out of the garbage
    collector's way until the reduce is done.

    The main process collects a row per cell; with 1,000 cells that set off a
    full collection, which re-read every object of the interpreter: 40 ms on
    one core, after the workers, while the other core waited. Frozen before
    the workers fork, the objects are not re-read by the workers' collections
    either (gc.freeze() before fork is what Python's documentation advises).
    A caller that froze objects itself keeps them frozen: nothing is done then.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _reduce(paths: SweepPaths, progress: bool) -> pa.Table:
    plan = read_plan_cells(paths)
    done_ids = _done_ids(paths, plan)
    tdir = paths.results_dir / TELEMETRY_DIR
    # A telemetry folder made now holds no partition of an earlier reduce.
    fresh_tdir = not tdir.is_dir()
    tdir.mkdir(parents=True, exist_ok=True)
    cache = load_cache(paths)
    done = _reduce_cells(paths, plan, cache, done_ids, tdir, progress)
    outcomes = [d.outcome for d in done]
    table = _summary_table([o.row for o in outcomes if o.row is not None])
    _write_outputs(paths, table, [o for o in outcomes if not o.verdict.ok])
    if not fresh_tdir:
        _drop_stale_partitions(tdir, set(table.column("cell_id").to_pylist()))
    fresh = {d.outcome.cell_id: d for d in done if not d.reused and d.key is not None}
    if fresh:
        for cid, d in fresh.items():
            cache[cid] = {"key": d.key, "ok": d.outcome.verdict.ok, "reason": d.outcome.verdict.reason,
                          "reduced": REDUCE_VERSION, "row": d.outcome.row}
        save_cache(paths, cache)
    return table


def _reuse(cid: str, hit: Any, key: Any, tdir: Path) -> CellOutcome | None:
    """The cached outcome when the cell's files are unchanged since the last
    reduce (same size and mtime of DONE.json and every file it lists, same
    reducer version) and, for a valid cell, its compacted partition exists."""
    if key is None or not isinstance(hit, dict) or hit.get("key") != key or hit.get("reduced") != REDUCE_VERSION:
        return None
    if not hit.get("ok"):
        return CellOutcome(cid, CellValidation(False, hit.get("reason")), None)
    if isinstance(hit.get("row"), dict) and os.path.exists(f"{partition_dir(tdir, cid)}/{PART_NAME}"):
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


def _done_ids(paths: SweepPaths, plan: dict[str, PlanCell]) -> list[str]:
    """Cells of the plan or the cells folder that have a DONE.json, sorted.

    Plain strings and os calls: the main process does this alone before the
    workers start, and pathlib costs several times as much per cell."""
    cells = str(paths.cells_dir)
    ids = set(plan)
    try:
        with os.scandir(cells) as it:
            ids.update(e.name for e in it if e.is_dir())
    except OSError:
        pass
    return sorted(cid for cid in ids if os.path.exists(f"{cells}/{cid}/{DONE_NAME}"))


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


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

_SORT_KEYS = ("model", "gpu_kind", "shards", "batch_size", "power_cap_w", "dataset", "cell_id")


def _summary_table(rows: list[dict[str, Any]]) -> pa.Table:
    def key(r: dict[str, Any]) -> tuple:
        # None sorts first (the uncapped run before its caps).
        return tuple((v is not None, 0 if v is None else v) for v in map(r.get, _SORT_KEYS))

    rows = sorted(rows, key=key)
    names = SUMMARY_SCHEMA.names
    # One tuple per row, transposed by zip: a third of the time of one list
    # comprehension per column (this runs after the workers, on one core).
    cols = zip(*[tuple(map(r.get, names)) for r in rows]) if rows else [()] * len(names)
    return pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, SUMMARY_SCHEMA)], schema=SUMMARY_SCHEMA)


def _write_outputs(paths: SweepPaths, table: pa.Table, invalid: list[CellOutcome]) -> None:
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


def _drop_stale_partitions(tdir: Path, keep: set[str]) -> None:
    """A cell that turned invalid (or was moved aside) must not stay in the compacted data."""
    with os.scandir(tdir) as it:
        stale = [e.path for e in it
                 if e.name.startswith("cell_id=") and e.name[len("cell_id="):] not in keep and e.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
