"""Reduce one cell: validate its files, decode each once, summarise, compact.

This is the per-cell work of ``reduce_sweep`` (summary.py runs it in worker
processes, one cell at a time per process, so memory holds a few cells' files
and never the whole sweep). Nearly all of its time is pyarrow's fixed cost per
file and per column chunk (docs/performance.md, "Reducer"): the code around
those calls is kept to what the checks and the summary need.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestrator.contracts import PHASES, REQUESTS_SCHEMA, TELEMETRY_SCHEMA, SweepPaths, parquet_without_arrow_schema
from orchestrator.reduce.files import write_derived
from orchestrator.reduce.metrics import BadValue, CellTelemetry, request_metrics, telemetry_metrics
from orchestrator.reduce.plan_io import PlanCell
from orchestrator.reduce.pqread import UNKNOWN, stats_constant
from orchestrator.reduce.validate import TELEMETRY_READ_SCHEMA, CellFile, CellValidation, InvalidCell, StatKey, check_cell

# Dictionary-encode only the repeated strings and keep statistics only where a
# reader filters (rank, time): half the encode time of the defaults. Written
# without the Arrow schema (parquet_without_arrow_schema), so columns built as
# dictionary arrays read back as the plain strings of COMPACT_SCHEMA.
COMPACT_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "use_dictionary": ["host", "gpu_uuid", "phase", "source"],
    "write_statistics": ["rank", "timestamp_ns"],
}
PART_NAME = "part-0.parquet"

# cell_id is not decoded: validation proved every row holds this cell (footer
# statistics), and in the compacted files it is the partition key.
_TELEMETRY_COLUMNS = [i for i, f in enumerate(TELEMETRY_SCHEMA) if f.name != "cell_id"]
# Of the requests file, only what request_metrics reads (cell_id was proved
# by the footer statistics; prompt and batch ids do not enter the summary).
_REQUEST_COLUMNS = [REQUESTS_SCHEMA.get_field_index(n)
                    for n in ("input_tokens", "output_tokens", "output_words", "start_ns", "end_ns")]
COMPACT_SCHEMA = pa.schema([TELEMETRY_SCHEMA.field(i) for i in _TELEMETRY_COLUMNS])
# Columns that name the GPU and where its samples came from: one value per
# file. They are rebuilt from that value instead of decoded (with rank, a
# third of the decode time of a telemetry file): rank from the file's name,
# which validation proved every row holds; the others when the footer
# statistics prove them constant (pqread.stats_constant).
_RANK_COLUMN = TELEMETRY_SCHEMA.get_field_index("rank")
_IDENTITY_COLUMNS = [TELEMETRY_SCHEMA.get_field_index(n) for n in ("host", "gpu_index", "gpu_uuid", "source")]
_IDENTITY_TEXT = ("host", "gpu_uuid", "source")
_PHASES = frozenset(PHASES)


@dataclass(frozen=True)
class CellOutcome:
    cell_id: str
    verdict: CellValidation
    row: dict[str, Any] | None


@dataclass(frozen=True)
class CellDone:
    """What a worker hands back: the outcome, the stat key it was computed
    for (the cache key) and whether it came from the cache."""

    outcome: CellOutcome
    key: Any
    reused: bool


def partition_dir(tdir: str | Path, cell_id: str) -> str:
    return f"{tdir}/cell_id={cell_id}"


def reduce_cell(paths: SweepPaths, cell_id: str, plan_cell: PlanCell | None, tdir: Path) -> CellDone:
    """Validate one cell and, if valid, summarise it and write its compacted telemetry."""
    params = plan_cell.params if plan_cell else {}
    key = StatKey()
    try:
        done, files = check_cell(paths, cell_id, int(params["shards"]) if "shards" in params else None,
                                 keep_data=True, key=key)
        cell, requests = _read_tables(files)
        row = cell_row(cell_id, params, plan_cell, done, cell, requests)
        write_compacted(tdir, cell_id, cell)
    except InvalidCell as e:
        outcome = CellOutcome(cell_id, CellValidation(False, str(e)), None)
    else:
        outcome = CellOutcome(cell_id, CellValidation(True, None), row)
    return CellDone(outcome, key.value(paths.cell_dir(cell_id)), False)


def _read_tables(files: list[CellFile]) -> tuple[CellTelemetry, pa.Table]:
    """Decode every file once, after all checks passed (so a file that cannot
    be decoded is the reason only when validate_cells finds none)."""
    tel = sorted((f for f in files if f.kind == "telemetry"), key=lambda f: f.rank)
    constant = _constant_columns(tel)
    decoded = [i for i in _TELEMETRY_COLUMNS if i not in constant]
    tables = [_read(f, decoded) for f in tel]
    rows = [t.num_rows for t in tables]
    names = [TELEMETRY_SCHEMA.field(i).name for i in decoded]
    text = [(n, names.index(n)) for n in _IDENTITY_TEXT if n in names]
    phase = names.index("phase")
    checked: list[pa.Array] = []
    for f, t in zip(tel, tables):
        _check_text(f, t, phase, text, checked)
    table = _concat(tables, decoded).replace_schema_metadata(None)
    by_name = {TELEMETRY_SCHEMA.field(i).name: table.column(j) for j, i in enumerate(decoded)}
    if by_name["timestamp_ns"].null_count:
        raise InvalidCell("timestamp_ns has missing values: the rows cannot be placed in the measured window")
    for i, values in constant.items():
        by_name[TELEMETRY_SCHEMA.field(i).name] = _repeat(values, rows, TELEMETRY_SCHEMA.field(i).type)
    # Names, not COMPACT_SCHEMA: the schema would cast the dictionary arrays to plain strings.
    table = pa.Table.from_arrays([by_name[n] for n in COMPACT_SCHEMA.names], names=COMPACT_SCHEMA.names)
    requests = pa.concat_tables([_read(f, _REQUEST_COLUMNS) for f in files if f.kind == "requests"])
    _check_requests(requests)
    return CellTelemetry.of_table(table, [f.rank for f in tel], rows, [f.meta for f in tel]), requests


def _concat(tables: list[pa.Table], columns: list[int]) -> pa.Table:
    """One table of the ranks' rows. Files that differ only in a column's
    nullability (a writer that declared a column required) are read into the
    documented, nullable schema first: concat_tables refuses mixed schemas."""
    try:
        return pa.concat_tables(tables)
    except pa.ArrowInvalid:
        schema = pa.schema([TELEMETRY_READ_SCHEMA.field(i) for i in columns])
        return pa.concat_tables([t.cast(schema) for t in tables])


def _check_text(f: CellFile, t: pa.Table, phase: int, text: list[tuple[str, int]], checked: list[pa.Array]) -> None:
    """Strings that reach the compacted copy must be UTF-8 (pyarrow does not
    check when it decodes, and a reader of the copy would fail on them), and
    phase one of PHASES. Decoded columns only (``text``: the identity columns
    decoded, by position; ``phase``: phase's position): a rebuilt one was
    checked from its statistics. Phase is checked on its dictionaries, a few
    values a file; one equal to a dictionary in ``checked`` (the ranks' files
    of a cell normally hold the same one) passed already."""
    for chunk in t.column(phase).chunks:
        values = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
        if any(values.equals(c) for c in checked):
            continue
        _valid_utf8(values, "phase", f.rel)
        odd = set(values.to_pylist()) - _PHASES
        odd.discard(None)
        if odd:
            raise InvalidCell(f"phase in {f.rel} holds {sorted(odd)[0]!r}, not one of {', '.join(PHASES)}")
        checked.append(values)
    for name, j in text:
        for chunk in t.column(j).chunks:
            _valid_utf8(chunk, name, f.rel)


def _valid_utf8(values: pa.Array, name: str, rel: str) -> None:
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        raise InvalidCell(f"column {name} in {rel} holds text that is not UTF-8") from None


# A response's token and word counts: far below this, so their sums over a
# cell stay exact in int64.
_MAX_COUNT = 1 << 40


def _check_requests(req: pa.Table) -> None:
    """Values the summary would turn into wrong numbers: missing, negative or
    impossible counts, and responses that end before they start."""
    if not req.num_rows:
        return  # an empty requests file was refused by name already
    for name in req.column_names:
        if req.column(name).null_count:
            raise InvalidCell(f"requests file has missing values in {name}")
    for name in ("input_tokens", "output_tokens", "output_words"):
        values = req.column(name).to_numpy()
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= _MAX_COUNT:
            raise InvalidCell(f"requests file holds {name} of {lo if lo < 0 else hi}")
    if (req.column("end_ns").to_numpy() < req.column("start_ns").to_numpy()).any():
        raise InvalidCell("requests file holds a response that ends before it starts (end_ns < start_ns)")


def _constant_columns(tel: list[CellFile]) -> dict[int, list[Any]]:
    """Columns known to hold one value per file, with that value per file
    (raw: bytes for strings, int for integers)."""
    out: dict[int, list[Any]] = {_RANK_COLUMN: [f.rank for f in tel]}
    for i in _IDENTITY_COLUMNS:
        values = [stats_constant(f.pf.metadata, i) for f in tel]  # type: ignore[union-attr]
        if all(map(_rebuildable, values)):
            out[i] = values
    return out


def _rebuildable(value: object) -> bool:
    """A value the statistics proved, usable as it is (a string that is not
    UTF-8 is left to the decoder, which gives the verdict)."""
    if value is None or value is UNKNOWN:
        return False
    if isinstance(value, bytes):
        try:
            value.decode()
        except UnicodeDecodeError:
            return False
    return True


def _repeat(values: list[Any], rows: list[int], typ: pa.DataType) -> pa.Array:
    """values[k] repeated rows[k] times, as a column of type ``typ``.

    Strings as a dictionary array (the values, then an index per row): the
    Parquet writer stores it as it is, where plain strings would be hashed
    row by row into a dictionary, a fifth of a cell's write cost. Written
    without the stored Arrow schema, the column reads back as plain strings."""
    if not pa.types.is_string(typ):
        return pa.array(np.repeat(np.asarray(values, dtype=typ.to_pandas_dtype()), rows), typ)
    # A dictionary of distinct values (the hosts of an 8-GPU node are one):
    # the writer stores the dictionary as given.
    # (A few values: plain Python, where np.unique on objects cost 0.1 ms a column.)
    distinct = list(dict.fromkeys(values))
    which = np.fromiter(map(distinct.index, values), np.int32, len(values))
    index = pa.array(np.repeat(which, rows))
    return pa.DictionaryArray.from_arrays(index, pa.array([v.decode() for v in distinct], typ))


def _read(f: CellFile, columns: list[int] | None) -> pa.Table:
    try:
        return f.pf.read(columns)
    except Exception as e:  # noqa: BLE001 - corrupt pages behind a valid footer
        raise InvalidCell(f"unreadable data in {f.rel} ({type(e).__name__})") from None


def cell_row(cell_id: str, params: dict[str, Any], plan_cell: PlanCell | None, done: dict[str, Any],
             cell: CellTelemetry, requests: pa.Table) -> dict[str, Any]:
    """The cell's summary row (docs/metrics.md)."""
    shards = int(done.get("world_size") or params.get("shards") or len(cell.ranks))
    cap = params.get("power_cap_w")
    try:
        tm = telemetry_metrics(cell, shards, None if cap is None else float(cap))
        rm = request_metrics(requests, tm["duration_s"], tm["energy_j"])
    except BadValue as e:
        raise InvalidCell(str(e)) from None
    except (ValueError, TypeError, KeyError, ZeroDivisionError, OverflowError, pa.ArrowException) as e:
        raise InvalidCell(f"cannot compute metrics: {type(e).__name__}: {e}") from None
    # The last guard against a wrong number: no NaN or infinity reaches the summary.
    for name, v in (*tm.items(), *rm.items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidCell(f"cannot compute metrics: {name} is {v}")
    if rm["output_tokens"] <= 0:
        raise InvalidCell("requests file holds no output tokens")
    slurm = done.get("slurm") if isinstance(done.get("slurm"), dict) else {}
    truncated = done.get("prompts_truncated")  # None: written by a worker that did not count them
    if truncated:
        tm["flags"] = ",".join(sorted({*filter(None, tm["flags"].split(",")), "truncated"}))
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
        "slurm_job_id": slurm_job_id(slurm),
        **tm,
        **rm,
        "prompts_truncated": truncated,
    }


def slurm_job_id(slurm: dict[str, Any]) -> str | None:
    """The cell's own Slurm job: ``ARRAY_TASK`` (``35_0``) for an array task,
    as squeue, sacct and scancel spell it; the plain id otherwise; None off Slurm.

    DONE.json's ``slurm`` object (contracts.slurm_context) holds the array's
    id as ``job_id`` and the task as ``array_task_id``: the array id alone
    names every cell of the array, not this one."""
    job = slurm.get("job_id")
    if job is None:
        return None
    task = slurm.get("array_task_id")
    return f"{job}_{task}" if task not in (None, "") else str(job)


def _sources(cell: CellTelemetry) -> str:
    names = {v for v in cell.table.column("source").unique().to_pylist() if v}
    return "+".join(sorted(names)) or "unknown"


def write_compacted(tdir: str | Path, cell_id: str, cell: CellTelemetry) -> None:
    """``tdir/cell_id=<id>/part-0.parquet``: every rank's rows, in rank order,
    and each rank's metadata under the wattsweep key."""
    meta = json.dumps({"ranks": [{"rank": r, **m} for r, m in zip(cell.ranks, cell.metas)]}, sort_keys=True)
    data = parquet_without_arrow_schema(cell.table, meta.encode(), **COMPACT_OPTIONS)
    # No fsync: the compacted copy is derived data that a rerun of reduce
    # rebuilds, and an fsync per cell cost more than writing it.
    write_derived(partition_dir(tdir, cell_id), PART_NAME, data)
