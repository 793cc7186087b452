"""Is a cell's output complete and trustworthy? Only valid cells are reduced.

Checks, in order (the first failure is the reason): DONE.json present and
parseable; every listed file exists; its sha256 matches; valid Parquet footer;
the expected schema (no extra, missing or retyped column); every row's cell_id
is this cell (and every telemetry row's rank is the file's rank); the requests
file has rows; a telemetry file for every rank 0..shards-1.

Checksums are the slow part of a large sweep, so a verdict is cached in
``results/.validation-cache.json`` (cache.py) keyed on the (size, mtime_ns) of
DONE.json and of every file it lists: an unchanged cell is not hashed again.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.contracts import (DONE_NAME, REQUESTS_SCHEMA, TELEMETRY_META_KEY, TELEMETRY_SCHEMA, SweepPaths,
                                   parquet_without_arrow_schema)
from orchestrator.reduce.cache import CACHE_NAME, CACHE_VERSION, load_cache, save_cache, stat_key
from orchestrator.reduce.files import read_with_stat
from orchestrator.reduce.parallel import ordered_map
from orchestrator.reduce.plan_io import read_plan_cells
from orchestrator.reduce.pqread import UNKNOWN, SmallParquet, stats_constant


# The phase column is decoded as a dictionary array: a few distinct strings
# per file, so the reducer neither builds a string per row nor hashes them
# again when it writes the compacted copy. Files are checked against the
# schema as it reads (phase a dictionary of strings); messages name the
# documented type.
DICTIONARY_COLUMNS = ("phase",)
# Asked for by position: by name, pyarrow builds a name-to-index map of the
# whole file for each file opened (2% of a cell's reduce). A file whose
# columns are elsewhere fails the schema check, which judges a column read
# as a dictionary by its stored type.
_DICTIONARY_INDICES = tuple(TELEMETRY_SCHEMA.get_field_index(n) for n in DICTIONARY_COLUMNS)
TELEMETRY_READ_SCHEMA = pa.schema([
    pa.field(f.name, pa.dictionary(pa.int32(), f.type)) if f.name in DICTIONARY_COLUMNS else f
    for f in TELEMETRY_SCHEMA
])


@dataclass(frozen=True)
class CellValidation:
    ok: bool
    reason: str | None = None


class InvalidCell(Exception):
    """Raised inside the checks; its message is the one-line reason."""


@dataclass(frozen=True)
class CellFile:
    """One checked output file: which rank, what kind, and its bytes (kept for reading)."""

    rel: str
    kind: str  # "telemetry" | "requests"
    rank: int
    pf: SmallParquet | None  # open on the checked bytes (keep_data=True), for the reducer
    meta: dict[str, Any]  # telemetry metadata ({} for requests)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def validate_cell(paths: SweepPaths, cell_id: str) -> CellValidation:
    return validate_cells(paths, [cell_id])[cell_id]


def validate_cells(paths: SweepPaths, cell_ids: Iterable[str]) -> dict[str, CellValidation]:
    """Validate many cells with one read and one write of the cache."""
    ids = list(cell_ids)
    cache = load_cache(paths)
    shards_by_cell = _plan_shards(paths)
    out: dict[str, CellValidation] = {}
    todo: list[str] = []
    for cid in ids:
        hit = cache.get(cid)
        # Only a cell with a cached verdict needs its files stat'ed up front;
        # the others get their key while they are read (StatKey).
        if isinstance(hit, dict) and hit.get("key") is not None and hit.get("key") == stat_key(paths, cid):
            out[cid] = CellValidation(bool(hit.get("ok")), hit.get("reason"))
        else:
            todo.append(cid)
    jobs = [(cid, shards_by_cell.get(cid)) for cid in todo]
    for cid, (v, key) in zip(todo, ordered_map(_verdict_job, jobs, init=_init_job, initargs=(paths,))):
        out[cid] = v
        if key is not None:
            cache[cid] = {"key": key, "ok": v.ok, "reason": v.reason}
    if todo:
        save_cache(paths, cache)
    return {cid: out[cid] for cid in ids}


_JOB: dict[str, Any] = {}


def _init_job(paths: SweepPaths) -> None:
    _JOB["paths"] = paths


def _verdict_job(job: tuple[str, int | None]) -> tuple[CellValidation, list[Any] | None]:
    paths, (cid, shards) = _JOB["paths"], job
    key = StatKey()
    try:
        check_cell(paths, cid, shards, keep_data=False, key=key)
    except InvalidCell as e:
        return CellValidation(False, str(e)), key.value(paths.cell_dir(cid))
    return CellValidation(True, None), key.value(paths.cell_dir(cid))


def check_cell(paths: SweepPaths, cell_id: str, plan_shards: int | None, *, keep_data: bool,
               key: "StatKey | None" = None) -> tuple[dict[str, Any], list[CellFile]]:
    """All checks; returns (DONE.json, files). Raises InvalidCell with the reason.

    ``key``, when given, collects the (size, mtime_ns) of DONE.json and of
    each file as it is opened, before it is read (see StatKey)."""
    cdir = str(paths.cell_dir(cell_id))  # plain strings: pathlib costs more than hashing a file here
    key = key if key is not None else StatKey()
    done = _read_done(cdir, cell_id, key)
    listed = done.get("files")
    if not isinstance(listed, dict) or not listed:
        raise InvalidCell("DONE.json lists no files")
    key.rels = sorted(listed)
    files = [_check_file(cdir, cell_id, rel, listed[rel], keep_data, key) for rel in key.rels]
    _check_complete(done, files, plan_shards)
    return done, files


def read_done(paths: SweepPaths, cell_id: str) -> dict[str, Any]:
    return _read_done(str(paths.cell_dir(cell_id)), cell_id, None)


def _read_done(cdir: str, cell_id: str, key: "StatKey | None") -> dict[str, Any]:
    try:
        raw, st = read_with_stat(f"{cdir}/{DONE_NAME}")
        done = json.loads(raw)
    except FileNotFoundError:
        raise InvalidCell("DONE.json missing") from None
    except (OSError, ValueError) as e:
        raise InvalidCell(f"DONE.json unreadable: {type(e).__name__}") from None
    if not isinstance(done, dict):
        raise InvalidCell("DONE.json is not a JSON object")
    if done.get("cell_id") not in (None, cell_id):
        raise InvalidCell(f"DONE.json belongs to cell {done.get('cell_id')}")
    _check_done_fields(done)
    if key is not None:
        key.done = [st.st_size, st.st_mtime_ns]
    return done


# DONE.json fields that reach the summary row as they are: a wrong type there
# would stop the whole reduce (or, for a count, give a wrong number).
_DONE_COUNTS = ("world_size", "nodes")
_DONE_TEXTS = ("gpu_name", "weights", "telemetry_source")
_DONE_TALLIES = ("prompts_truncated",)  # counts that may be 0


def _check_done_fields(done: dict[str, Any]) -> None:
    for name in _DONE_COUNTS:
        v = done.get(name)
        if v is not None and not _is_count(v):
            raise InvalidCell(f"DONE.json {name} is {v!r}; expected a whole number >= 1")
    for name in _DONE_TEXTS:
        v = done.get(name)
        if v is not None and not isinstance(v, str):
            raise InvalidCell(f"DONE.json {name} is {v!r}; expected text")
    for name in _DONE_TALLIES:
        v = done.get(name)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31):
            raise InvalidCell(f"DONE.json {name} is {v!r}; expected a whole number >= 0")


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 1 << 31


class StatKey:
    """The validation cache key of a cell, gathered while it is checked.

    The key is the (size, mtime_ns) of DONE.json and of every file it lists,
    in file-name order, each taken from the open file *before* it is read: a
    file changed after that gets a new key next time, so a cached verdict is
    never older than the bytes it judged. One pass replaces a stat of every
    file up front followed by the reads (the files were opened twice).
    """

    __slots__ = ("done", "rels", "seen")

    def __init__(self) -> None:
        self.done: list[int] | None = None
        self.rels: list[str] | None = None
        self.seen: dict[str, list[Any]] = {}

    def add(self, rel: str, st: os.stat_result) -> None:
        self.seen[rel] = [rel, st.st_size, st.st_mtime_ns]

    def value(self, cdir: str | Path) -> list[Any] | None:
        """The key; files a failed check never reached are stat'ed now (their
        bytes did not decide the verdict). None when DONE.json or a listed
        file is missing or unreadable: such a verdict is not cached."""
        if self.done is None or self.rels is None:
            return None
        key: list[Any] = [self.done]
        for rel in self.rels:
            entry = self.seen.get(rel)
            if entry is None:
                try:
                    st = os.stat(os.path.join(cdir, rel))
                except (OSError, ValueError):
                    return None
                entry = [rel, st.st_size, st.st_mtime_ns]
            key.append(entry)
        return key


# ---------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------


def _check_file(cdir: str, cell_id: str, rel: str, entry: Any, keep_data: bool, key: StatKey) -> CellFile:
    kind, rank = _kind_and_rank(rel)
    try:
        data, st = read_with_stat(os.path.join(cdir, rel))
    except FileNotFoundError:
        raise InvalidCell(f"missing file {rel}") from None
    except OSError as e:
        raise InvalidCell(f"unreadable file {rel}: {e.strerror}") from None
    key.add(rel, st)
    want = entry.get("sha256") if isinstance(entry, dict) else None
    if hashlib.sha256(data).hexdigest() != want:
        raise InvalidCell(f"checksum mismatch in {rel}")
    telemetry = kind == "telemetry"
    dictionary = _DICTIONARY_INDICES if telemetry else ()
    pf = _open_parquet(rel, data, dictionary)
    md = pf.metadata
    expected = TELEMETRY_SCHEMA if telemetry else REQUESTS_SCHEMA
    key_values = md.metadata or {}
    if not _as_written(md, key_values, telemetry):
        schema = pf.schema_arrow
        if not schema.equals(TELEMETRY_READ_SCHEMA if telemetry else expected, check_metadata=False):
            _check_schema(rel, schema, expected, dictionary)
        key_values = schema.metadata or {}
    if isinstance(entry, dict) and "rows" in entry and _as_int(entry["rows"]) != md.num_rows:
        raise InvalidCell(f"row count of {rel} is {md.num_rows}, DONE.json says {entry['rows']}")
    if md.num_rows == 0:
        raise InvalidCell(f"empty {kind} file {rel}")
    _check_constant(pf, md, rel, "cell_id", expected.get_field_index("cell_id"), cell_id)
    meta: dict[str, Any] = {}
    if telemetry:
        _check_constant(pf, md, rel, "rank", expected.get_field_index("rank"), rank)
        meta = _meta_of(key_values)
        _check_window(rel, meta)
        _check_meta_values(rel, meta)
    return CellFile(rel, kind, rank, pf if keep_data else None, meta)


def _as_int(x: Any) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError, OverflowError):
        return None  # never equal to a row count: the check names the file


def _kind_and_rank(rel: str) -> tuple[str, int]:
    """("telemetry", rank) or ("requests", 0) from the names workers write:
    telemetry/rank-<rank>.parquet and requests/rank-0.parquet (rank 0 writes
    every response). One spelling per rank: int() alone would also read
    rank-01 or rank-+1, and a rank listed twice would be counted twice."""
    parts = rel.split("/")
    if len(parts) == 2 and parts[0] in ("telemetry", "requests") and parts[1].startswith("rank-") and parts[1].endswith(".parquet"):
        digits = parts[1][5:-8]
        if digits.isdigit() and digits.isascii() and f"rank-{int(digits)}.parquet" == parts[1]:
            if parts[0] == "telemetry" or digits == "0":
                return parts[0], int(digits)
    raise InvalidCell(f"unexpected file {rel} in DONE.json")


# The Parquet schemas of files written as the sampler writes them. A file whose
# Parquet schema is one of these and that stores no Arrow schema (which could
# map a column to another Arrow type) decodes to exactly the expected Arrow
# schema: comparing Parquet schemas costs a fraction of building the Arrow
# schema and comparing it (arrow's Schema.equals fingerprints every field of a
# new schema), 3% of a cell's instructions over its 9 files.
_ARROW_SCHEMA_KEY = b"ARROW:schema"


@functools.cache
def _written_tree(telemetry: bool) -> str:
    """The Parquet schema tree of TELEMETRY_SCHEMA (or REQUESTS_SCHEMA) as
    contracts.parquet_without_arrow_schema writes it, made on first use: a
    Parquet write before the workers fork would leave each of them 8 MiB of
    the writer's memory."""
    schema = TELEMETRY_SCHEMA if telemetry else REQUESTS_SCHEMA
    return _tree(pq.ParquetSchema(SmallParquet(parquet_without_arrow_schema(schema.empty_table(), None)).metadata))


def _tree(schema: pq.ParquetSchema) -> str:
    """Every node of the schema, groups included, as pyarrow prints it (less the line
    with the object's address). ParquetSchema.equals compares the leaf columns only:
    columns moved into a required group (a struct) would pass it unchanged."""
    return str(schema).split("\n", 1)[-1]


def _as_written(md: pq.FileMetaData, key_values: dict[bytes, bytes], telemetry: bool) -> bool:
    """The file decodes to the expected Arrow schema, judged from its Parquet schema alone."""
    # ParquetSchema(md), not md.schema: that property keeps the schema in md,
    # and the schema keeps md, a cycle that held each file's footer until the
    # garbage collector's next full pass (10 MiB more per worker).
    return _ARROW_SCHEMA_KEY not in key_values and _tree(pq.ParquetSchema(md)) == _written_tree(telemetry)


def _open_parquet(rel: str, data: bytes, dictionary: tuple[int, ...]) -> SmallParquet:
    try:
        return SmallParquet(data, dictionary)
    except Exception as e:  # noqa: BLE001 - any footer error is the same verdict
        raise InvalidCell(f"not a valid Parquet file {rel} ({type(e).__name__})") from None


def _check_schema(rel: str, got: pa.Schema, expected: pa.Schema, dictionary: tuple[int, ...]) -> None:
    twice = [n for i, n in enumerate(got.names) if n in got.names[:i]]
    if twice:
        raise InvalidCell(f"column {twice[0]} appears twice in {rel}")
    extra = [n for n in got.names if n not in expected.names]
    if extra:
        raise InvalidCell(f"unexpected column {extra[0]} in {rel}")
    for f in expected:
        idx = got.get_field_index(f.name)
        if idx < 0:
            raise InvalidCell(f"missing column {f.name} in {rel}")
        typ = got.field(idx).type
        if pa.types.is_dictionary(typ) and idx in dictionary:
            typ = typ.value_type  # read as a dictionary on purpose: judge the stored type
        if not typ.equals(f.type):
            raise InvalidCell(f"column {f.name} in {rel} is {typ}, expected {f.type}")
    # The reducer reads columns by position, so a file with the right columns
    # in another order is refused by name rather than read into wrong names.
    for have, want in zip(got.names, expected.names):
        if have != want:
            raise InvalidCell(f"columns of {rel} are out of order: {have} where {want} belongs")


def _meta_of(key_values: dict[bytes, bytes]) -> dict[str, Any]:
    """The wattsweep metadata of a telemetry file's key-value metadata ({} when absent or unreadable)."""
    raw = key_values.get(TELEMETRY_META_KEY)
    try:
        meta = json.loads(raw.decode()) if raw else {}
    except (ValueError, UnicodeDecodeError):
        meta = None
    return meta if isinstance(meta, dict) else {}


def _check_window(rel: str, meta: dict[str, Any]) -> None:
    ws, we = meta.get("window_start_ns"), meta.get("window_end_ns")
    if not _is_time_ns(ws) or not _is_time_ns(we):
        raise InvalidCell(f"no measured window in {rel}")
    if we <= ws:
        raise InvalidCell(f"empty measured window in {rel}")


def _is_time_ns(v: Any) -> bool:
    """A clock reading in ns as the telemetry's timestamp_ns column holds it (int64)."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_meta_values(rel: str, meta: dict[str, Any]) -> None:
    """The metadata values the summary takes as they are."""
    for name in ("energy_start_j", "energy_end_j"):
        v = meta.get(name)
        if v is not None and not (_is_number(v) and math.isfinite(v)):
            raise InvalidCell(f"energy counter reading {name} in {rel} is {v!r}; expected a finite number or null")
    v = meta.get("sample_period_s")
    if v is not None and not (_is_number(v) and 0 < v < math.inf):
        raise InvalidCell(f"sample_period_s in {rel} is {v!r}; expected a positive number of seconds")
    v = meta.get("gpu_name")
    if v is not None and not isinstance(v, str):
        raise InvalidCell(f"gpu_name in {rel} is {v!r}; expected text")


def _check_constant(pf: SmallParquet, md: pq.FileMetaData, rel: str, column: str, col_idx: int, want: Any) -> None:
    """Every row of ``column`` equals ``want``: from footer statistics when the
    writer kept them (no data read), else from the column itself."""
    if md.num_rows == 0:
        return
    value = stats_constant(md, col_idx)
    if value is UNKNOWN:
        try:
            values = pf.read([col_idx]).column(0).unique().to_pylist()
        except Exception as e:  # noqa: BLE001 - corrupt pages
            raise InvalidCell(f"unreadable column {column} in {rel} ({type(e).__name__})") from None
        verdict = values == [want]
    else:
        verdict = value == (want.encode() if isinstance(want, str) else want)
    if not verdict:
        what = "cell" if column == "cell_id" else column
        raise InvalidCell(f"{rel} holds rows of another {what}")


# ---------------------------------------------------------------------------
# The cell as a whole
# ---------------------------------------------------------------------------


def _check_complete(done: dict[str, Any], files: list[CellFile], plan_shards: int | None) -> None:
    if not any(f.kind == "requests" for f in files):
        raise InvalidCell("no requests file")
    world = done.get("world_size")  # type checked on reading DONE.json
    if world is not None and plan_shards is not None and world != plan_shards:
        raise InvalidCell(f"DONE.json says world_size={world}, the plan says shards={plan_shards}")
    shards = world if world is not None else plan_shards
    if shards is None:
        raise InvalidCell("shard count unknown: no world_size in DONE.json and the cell is not in plan.jsonl")
    ranks = {f.rank for f in files if f.kind == "telemetry"}
    missing = [r for r in range(int(shards)) if r not in ranks]
    if missing:
        raise InvalidCell(f"missing telemetry for rank {missing[0]} of {shards}")
    beyond = sorted(r for r in ranks if r >= shards)
    if beyond:
        raise InvalidCell(f"telemetry for rank {beyond[0]}, beyond world_size {shards}")


def _plan_shards(paths: SweepPaths) -> dict[str, int]:
    return {cid: int(c.params["shards"]) for cid, c in read_plan_cells(paths).items() if "shards" in c.params}


__all__ = ["CACHE_NAME", "CACHE_VERSION", "CellFile", "CellValidation", "InvalidCell", "StatKey", "check_cell",
           "load_cache", "read_done", "read_with_stat", "save_cache", "stat_key", "validate_cell", "validate_cells"]
