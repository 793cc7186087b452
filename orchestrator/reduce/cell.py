"""Reduce one cell: validate its files, decode each once, summarise, compact.

This is the per-cell work of ``reduce_sweep`` (summary.py runs it in worker
processes, one cell at a time per process, so memory holds a few cells' files
and never the whole sweep). Nearly all of its time is pyarrow's fixed cost per
file and per column chunk (docs/performance.md, "Reducer"): the code around
those calls is kept to what the checks and the summary need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.contracts import TELEMETRY_META_KEY, TELEMETRY_SCHEMA, SweepPaths
from orchestrator.reduce.files import write_derived
from orchestrator.reduce.metrics import CellTelemetry, request_metrics, telemetry_metrics
from orchestrator.reduce.plan_io import PlanCell
from orchestrator.reduce.validate import CellFile, CellValidation, InvalidCell, StatKey, check_cell

# Dictionary-encode only the repeated strings and keep statistics only where a
# reader filters (rank, time, phase): half the encode time of the defaults.
COMPACT_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "use_dictionary": ["host", "gpu_uuid", "phase", "source"],
    "write_statistics": ["rank", "timestamp_ns", "phase"],
}
PART_NAME = "part-0.parquet"

# cell_id is not decoded: validation proved every row holds this cell (footer
# statistics), and in the compacted files it is the partition key.
_TELEMETRY_COLUMNS = [i for i, f in enumerate(TELEMETRY_SCHEMA) if f.name != "cell_id"]


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    verdict: CellValidation
    row: dict[str, Any] | None


@dataclass(frozen=True)
class CellDone:
    """What a worker hands back: the outcome, the stat key it was computed
    for (the cache key), whether it came from the cache and, for a fresh
    outcome with a key, its cache entry as JSON (encoded by the worker)."""

    outcome: CellOutcome
    key: Any
    reused: bool
    cache_json: str | None = None


def partition_dir(tdir: str | Path, cell_id: str) -> str:
    return f"{tdir}/cell_id={cell_id}"


def reduce_cell(paths: SweepPaths, cell_id: str, plan_cell: PlanCell | None, tdir: Path) -> CellDone:
    """Validate one cell and, if valid, summarise it and write its compacted telemetry."""
    params = plan_cell.params if plan_cell else {}
    key = StatKey()
    decoded = _Decoded()
    try:
        done, _ = check_cell(paths, cell_id, int(params["shards"]) if "shards" in params else None,
                             keep_data=True, key=key, on_file=decoded.add)
        cell, requests = decoded.tables()
        row = cell_row(cell_id, params, plan_cell, done, cell, requests)
        write_compacted(tdir, cell_id, cell)
    except InvalidCell as e:
        outcome = CellOutcome(cell_id, CellValidation(False, str(e)), None)
    else:
        outcome = CellOutcome(cell_id, CellValidation(True, None), row)
    return CellDone(outcome, key.value(paths.cell_dir(cell_id)), False)


class _Decoded:
    """Each file's table, decoded as soon as the file passes its checks.

    Decoding right after the checks reads bytes the checksum has just brought
    into the CPU cache, and the file's reader and bytes are freed at once
    instead of all nine staying alive until the last check. A file that
    cannot be decoded is only the cell's reason once every check has passed
    (``tables``): the reason stays the one validate_cells gives, which never
    decodes.
    """

    __slots__ = ("_telemetry", "_requests", "_errors")

    def __init__(self) -> None:
        self._telemetry: list[tuple[int, pa.Table, dict[str, Any]]] = []
        self._requests: list[pa.Table] = []
        self._errors: list[tuple[tuple[int, int], str]] = []

    def add(self, f: CellFile) -> None:
        telemetry = f.kind == "telemetry"
        try:
            table = f.pf.read(_TELEMETRY_COLUMNS if telemetry else None)
        except Exception as e:  # noqa: BLE001 - corrupt pages behind a valid footer
            # Ranked as the reducer always read them: telemetry by rank, then requests.
            self._errors.append(((0 if telemetry else 1, f.rank), f"unreadable data in {f.rel} ({type(e).__name__})"))
            return
        finally:
            f.pf = None
        if telemetry:
            self._telemetry.append((f.rank, table, f.meta))
        else:
            self._requests.append(table)

    def tables(self) -> tuple[CellTelemetry, pa.Table]:
        """The cell's telemetry (ranks in order) and requests; InvalidCell
        naming the first file that could not be decoded."""
        if self._errors:
            raise InvalidCell(min(self._errors)[1])
        tel = sorted(self._telemetry, key=lambda t: t[0])
        cell = CellTelemetry.of([t[1] for t in tel], [t[0] for t in tel], [t[2] for t in tel])
        return cell, pa.concat_tables(self._requests)


def cell_row(cell_id: str, params: dict[str, Any], plan_cell: PlanCell | None, done: dict[str, Any],
             cell: CellTelemetry, requests: pa.Table) -> dict[str, Any]:
    """The cell's summary row (docs/metrics.md)."""
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


def write_compacted(tdir: str | Path, cell_id: str, cell: CellTelemetry) -> None:
    """``tdir/cell_id=<id>/part-0.parquet``: every rank's rows, in rank order."""
    meta = json.dumps({"ranks": [{"rank": r, **m} for r, m in zip(cell.ranks, cell.metas)]}, sort_keys=True)
    table = cell.table
    # An Arrow buffer, not io.BytesIO: the writer then appends in C++ rather
    # than calling back into Python for every page.
    sink = pa.BufferOutputStream()
    # The strings arrive as dictionaries (validate.DICTIONARY_COLUMNS), which
    # the writer stores as they are instead of hashing every row. No stored
    # Arrow schema (it would name the dictionary type): a reader derives the
    # documented one, strings included, from the Parquet schema; the metadata
    # goes into the file's key-value metadata, where readers find it.
    with pq.ParquetWriter(sink, table.schema.remove_metadata(), store_schema=False, **COMPACT_OPTIONS) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({TELEMETRY_META_KEY: meta.encode()})
    # No fsync: the compacted copy is derived data that a rerun of reduce
    # rebuilds, and an fsync per cell cost more than writing it.
    write_derived(partition_dir(tdir, cell_id), PART_NAME, sink.getvalue())
