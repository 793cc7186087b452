"""Cell outputs whose footers and schemas are fine but whose values are not:
DONE.json fields of the wrong type or count, files under a second name, odd
metadata, rows no metric can be built on. Each gives a named reason (in
results/invalid.csv and, after the reduce, in status's verdict), never a
traceback and never a wrong number in the summary."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.contracts import TELEMETRY_META_KEY, SweepPaths, read_json, write_done
from orchestrator.reduce import open_telemetry, read_invalid, reduce_sweep, validate_cell
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan
from test_reduce_validate import SPEC, _redo_done, _rewrite, _sweep

ENERGY_J = 150.0 * 5.0 * 2  # SPEC's power over its measured window, two GPUs


def _refused(paths: SweepPaths, good: str, bad: str, reason: str) -> None:
    """The reduce keeps the good cell (right numbers) and refuses the bad one
    with ``reason``, which status's validator then reports too."""
    table = reduce_sweep(paths.root)
    assert table.column("cell_id").to_pylist() == [good]
    assert table.column("energy_j").to_pylist() == [pytest.approx(ENERGY_J)]
    got = dict(read_invalid(paths.root)).get(bad)
    assert got == reason
    assert validate_cell(paths, bad).reason == reason


def _edit_done(paths: SweepPaths, cid: str, **fields) -> None:
    done = read_json(paths.done_marker(cid))
    done.update(fields)
    paths.done_marker(cid).write_text(json.dumps(done))


def _list_files(paths: SweepPaths, cid: str, extra: dict[str, int]) -> None:
    """DONE.json rewritten to list ``extra`` files (rel -> rows) too."""
    done = read_json(paths.done_marker(cid))
    files = {rel: e["rows"] for rel, e in done["files"].items()} | extra
    keep = {k: v for k, v in done.items() if k not in ("files", "cell_id", "schema_version", "finished_unix_s")}
    write_done(paths, cid, files, keep)


def _edit_telemetry(paths: SweepPaths, cid: str, rank: int, fn) -> None:
    f = paths.telemetry_file(cid, rank)
    _rewrite(f, fn(pq.read_table(f)))
    _redo_done(paths, cid)


def _with_meta(t: pa.Table, **fields) -> pa.Table:
    meta = json.loads(t.schema.metadata[TELEMETRY_META_KEY]) | fields
    return t.replace_schema_metadata({TELEMETRY_META_KEY: json.dumps(meta).encode()})


def _with_value(column: str, value, row: int = 30):
    """An edit that puts ``value`` in one row inside the measured window."""
    def edit(t: pa.Table) -> pa.Table:
        values = t.column(column).to_pylist()
        values[row] = value
        i = t.schema.get_field_index(column)
        return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))
    return edit


def _sweep_without_counter(tmp_path):
    """Cells whose energy is integrated power (cards without an energy counter)."""
    paths = SweepPaths.of(tmp_path / "sweep")
    spec = CellSpec(seconds=6.0, warmup_s=1.0, power_w=150.0, n_responses=8, has_counter=False)
    params = [cell_params(shards=2, seed=i) for i in range(2)]
    ids = write_plan(paths, params)
    for p in params:
        write_cell(paths, p, spec)
    return paths, ids


# --------------------------------------------------------------------------- DONE.json


@pytest.mark.parametrize("value", ["abc", "2", 2.5, [2], True, 0, -2])
def test_world_size_that_is_not_a_count(tmp_path, value):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_done(paths, bad, world_size=value)
    _refused(paths, good, bad, f"DONE.json world_size is {value!r}; expected a whole number >= 1")


def test_world_size_below_the_plan_with_a_rank_missing(tmp_path):
    """Before, DONE.json's count won over the plan's: rank 1 missing, half the energy, no flag."""
    paths, (good, bad) = _sweep(tmp_path)
    paths.telemetry_file(bad, 1).unlink()
    _redo_done(paths, bad, drop="telemetry/rank-1.parquet")
    _edit_done(paths, bad, world_size=1)
    _refused(paths, good, bad, "DONE.json says world_size=1, the plan says shards=2")


@pytest.mark.parametrize("field, value, what", [
    ("nodes", "abc", "a whole number >= 1"), ("gpu_name", {"x": 1}, "text"),
    ("weights", 5, "text"), ("telemetry_source", 7, "text"),
    ("prompts_truncated", -1, "a whole number >= 0"), ("prompts_truncated", "3", "a whole number >= 0"),
    ("prompts_truncated", True, "a whole number >= 0"),
])
def test_done_field_of_the_wrong_type(tmp_path, field, value, what):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_done(paths, bad, **{field: value})
    _refused(paths, good, bad, f"DONE.json {field} is {value!r}; expected {what}")


def test_telemetry_of_a_rank_beyond_world_size(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    t = pq.read_table(paths.telemetry_file(bad, 1))
    t = t.set_column(t.schema.get_field_index("rank"), "rank", pa.array(np.full(t.num_rows, 2, np.int32)))
    pq.write_table(t, paths.telemetry_file(bad, 2))
    _list_files(paths, bad, {"telemetry/rank-2.parquet": t.num_rows})
    _refused(paths, good, bad, "telemetry for rank 2, beyond world_size 2")


@pytest.mark.parametrize("alias", ["telemetry/rank-01.parquet", "telemetry/rank-+1.parquet", "requests/rank-1.parquet"])
def test_a_file_under_a_second_name(tmp_path, alias):
    """A rank's file listed twice (int() reads rank-01 and rank-+1 as 1), or a
    second requests file: before, both copies were summed."""
    paths, (good, bad) = _sweep(tmp_path)
    src = paths.requests_file(bad) if alias.startswith("requests") else paths.telemetry_file(bad, 1)
    shutil.copy(src, paths.cell_dir(bad) / alias)
    _list_files(paths, bad, {alias: pq.read_metadata(src).num_rows})
    _refused(paths, good, bad, f"unexpected file {alias} in DONE.json")


# --------------------------------------------------------------------------- footer metadata


@pytest.mark.parametrize("fields, reason", [
    ({"window_start_ns": 2**70, "window_end_ns": 2**71}, "no measured window in telemetry/rank-0.parquet"),
    ({"window_start_ns": False, "window_end_ns": True}, "no measured window in telemetry/rank-0.parquet"),
    ({"energy_start_j": float("nan")},
     "energy counter reading energy_start_j in telemetry/rank-0.parquet is nan; expected a finite number or null"),
    ({"energy_end_j": True},
     "energy counter reading energy_end_j in telemetry/rank-0.parquet is True; expected a finite number or null"),
    ({"sample_period_s": float("nan")},
     "sample_period_s in telemetry/rank-0.parquet is nan; expected a positive number of seconds"),
    ({"gpu_name": ["H100"]}, "gpu_name in telemetry/rank-0.parquet is ['H100']; expected text"),
])
def test_metadata_values(tmp_path, fields, reason):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_telemetry(paths, bad, 0, lambda t: _with_meta(t, **fields))
    _refused(paths, good, bad, reason)


# --------------------------------------------------------------------------- telemetry rows


def test_empty_telemetry_file(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_telemetry(paths, bad, 1, lambda t: t.slice(0, 0))
    _refused(paths, good, bad, "empty telemetry file telemetry/rank-1.parquet")


@pytest.mark.parametrize("counter", [True, False])
@pytest.mark.parametrize("power_w", [float("inf"), -1e9, -1.0])
def test_power_that_is_not_a_reading(tmp_path, counter, power_w):
    paths, (good, bad) = _sweep(tmp_path) if counter else _sweep_without_counter(tmp_path)
    _edit_telemetry(paths, bad, 0, _with_value("power_w", power_w))
    _refused(paths, good, bad, "power_w holds negative or infinite values")


def test_missing_timestamp(tmp_path):
    """Before: the row was dropped without a gap flag (integrated energy 1% low)."""
    paths, (good, bad) = _sweep_without_counter(tmp_path)
    _edit_telemetry(paths, bad, 0, _with_value("timestamp_ns", None))
    _refused(paths, good, bad, "timestamp_ns has missing values: the rows cannot be placed in the measured window")


def test_phase_outside_the_documented_set(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_telemetry(paths, bad, 0, _with_value("phase", "DECODE"))
    _refused(paths, good, bad,
             "phase in telemetry/rank-0.parquet holds 'DECODE', not one of load, warmup, prefill, decode, idle")


def test_phase_outside_the_set_in_a_later_row_group(tmp_path):
    """A file of many row groups decodes to many chunks: every one is checked."""
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 1)
    pq.write_table(_with_value("phase", "DECODE", row=50)(pq.read_table(f)), f, row_group_size=17)
    _redo_done(paths, bad)
    assert pq.read_metadata(f).num_row_groups >= 3
    _refused(paths, good, bad,
             "phase in telemetry/rank-1.parquet holds 'DECODE', not one of load, warmup, prefill, decode, idle")


def test_host_that_is_not_utf8(tmp_path):
    """pyarrow decodes such a string without a check; the compacted copy would then fail its readers."""
    paths, (good, bad) = _sweep(tmp_path)

    def edit(t: pa.Table) -> pa.Table:
        n, value = t.num_rows, b"node-\xff"
        offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * len(value))
        host = pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(value * n)])
        return t.set_column(t.schema.get_field_index("host"), "host", host)

    _edit_telemetry(paths, bad, 0, edit)
    _refused(paths, good, bad, "column host in telemetry/rank-0.parquet holds text that is not UTF-8")
    assert open_telemetry(paths.root).to_table().column("host").to_pylist()  # the copy reads back


def test_column_named_twice(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_telemetry(paths, bad, 0, lambda t: t.append_column("power_w", t.column("power_w")))
    _refused(paths, good, bad, "column power_w appears twice in telemetry/rank-0.parquet")


def test_one_rank_written_with_required_columns_is_read(tmp_path):
    """A writer that declared its columns required (non-nullable) on one rank
    only: the same values, so the cell is valid and its numbers right."""
    paths, (good, other) = _sweep(tmp_path)

    def edit(t: pa.Table) -> pa.Table:
        return t.cast(pa.schema([f.with_nullable(f.name == "energy_j") for f in t.schema], metadata=t.schema.metadata))

    _edit_telemetry(paths, other, 0, edit)
    table = reduce_sweep(paths.root)
    assert sorted(table.column("cell_id").to_pylist()) == sorted([good, other])
    assert table.column("energy_j").to_pylist() == [pytest.approx(ENERGY_J)] * 2
    assert read_invalid(paths.root) == []


# --------------------------------------------------------------------------- requests


def _edit_requests(paths: SweepPaths, cid: str, column: str, fn) -> None:
    f = paths.requests_file(cid)
    t = pq.read_table(f)
    i = t.schema.get_field_index(column)
    values = fn(t.column(column).to_pylist(), t)
    _rewrite(f, t.set_column(i, t.schema.field(i), pa.array(values, pa.int64())))
    _redo_done(paths, cid)


@pytest.mark.parametrize("column, fn, reason", [
    ("output_tokens", lambda v, t: [-100] + v[1:], "requests file holds output_tokens of -100"),
    ("output_tokens", lambda v, t: [2**63 - 1, 2**63 - 1] + v[2:],
     f"requests file holds output_tokens of {2**63 - 1}"),
    ("output_words", lambda v, t: v[:-1] + [-1], "requests file holds output_words of -1"),
    ("end_ns", lambda v, t: v[:-1] + [None], "requests file has missing values in end_ns"),
    ("end_ns", lambda v, t: [s - 10**9 for s in t.column("start_ns").to_pylist()],
     "requests file holds a response that ends before it starts (end_ns < start_ns)"),
])
def test_requests_values(tmp_path, column, fn, reason):
    paths, (good, bad) = _sweep(tmp_path)
    _edit_requests(paths, bad, column, fn)
    _refused(paths, good, bad, reason)


def test_requests_as_written_are_summed_exactly(tmp_path):
    """The guard above does not refuse what workers write."""
    paths, (good, other) = _sweep(tmp_path)
    table = reduce_sweep(paths.root)
    assert table.column("output_tokens").to_pylist() == [SPEC.n_responses * SPEC.tokens_per_response] * 2


# ----------------------------------------------- files written as the sampler writes them
# (no stored Arrow schema: the validator judges their schema from the Parquet schema alone)


def _struct_of(t: pa.Table, names: list[str], group: str) -> pa.Table:
    """``t`` with the adjacent columns ``names`` moved into one required struct ``group``:
    the same leaf columns, levels and types in the Parquet schema, one group node more."""
    first = t.schema.get_field_index(names[0])
    struct = pa.StructArray.from_arrays([t.column(n).combine_chunks() for n in names],
                                        fields=[t.schema.field(n) for n in names])
    fields, columns = [], []
    for i, f in enumerate(t.schema):
        if i == first:
            fields.append(pa.field(group, struct.type, nullable=False))
            columns.append(struct)
        elif f.name not in names:
            fields.append(f)
            columns.append(t.column(i))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=t.schema.metadata))


def _write_as_sampler(path, table: pa.Table, telemetry: bool) -> None:
    from orchestrator.contracts import TELEMETRY_PARQUET_OPTIONS, parquet_without_arrow_schema

    meta = (table.schema.metadata or {}).get(TELEMETRY_META_KEY)
    options = TELEMETRY_PARQUET_OPTIONS if telemetry else {}
    path.write_bytes(parquet_without_arrow_schema(table, meta, **options).to_pybytes())


def test_files_as_the_sampler_writes_them_take_the_parquet_schema_check(tmp_path):
    """The check below is the one these files meet (otherwise the tests after this one
    would test the Arrow schema's check again); a struct is not taken for its leaves."""
    from orchestrator.reduce.validate import _as_written

    paths, (good, _) = _sweep(tmp_path)
    md = pq.read_metadata(paths.telemetry_file(good, 0))
    assert _as_written(md, md.metadata or {}, True)
    f = paths.requests_file(good)
    t = pq.read_table(f)
    _write_as_sampler(f, t, telemetry=False)
    assert _as_written(pq.read_metadata(f), pq.read_metadata(f).metadata or {}, False)
    _write_as_sampler(f, _struct_of(t, ["start_ns"], "start_ns"), telemetry=False)
    assert not _as_written(pq.read_metadata(f), pq.read_metadata(f).metadata or {}, False)


@pytest.mark.parametrize("names, group, ranks, reason", [
    (["power_w"], "power_w", [1], "column power_w in telemetry/rank-1.parquet is struct<power_w: double>, expected double"),
    (["power_w", "energy_j"], "pe", [0, 1], "unexpected column pe in telemetry/rank-0.parquet"),
    (["phase"], "phase", [0], "column phase in telemetry/rank-0.parquet is "
                              "struct<phase: dictionary<values=string, indices=int32, ordered=0>>, expected string"),
])
def test_telemetry_columns_moved_into_a_struct(tmp_path, names, group, ranks, reason):
    """A writer that nests columns in a required group: Parquet's leaf columns are the
    same as the contract's, the decoded columns are not."""
    paths, (good, bad) = _sweep(tmp_path)
    for rank in ranks:
        f = paths.telemetry_file(bad, rank)
        _write_as_sampler(f, _struct_of(pq.read_table(f), names, group), telemetry=True)
    _redo_done(paths, bad)
    _refused(paths, good, bad, reason)


@pytest.mark.parametrize("names, group, reason", [
    (["input_tokens", "output_tokens"], "g", "unexpected column g in requests/rank-0.parquet"),
    (["start_ns"], "start_ns", "column start_ns in requests/rank-0.parquet is struct<start_ns: int64>, expected int64"),
])
def test_requests_columns_moved_into_a_struct(tmp_path, names, group, reason):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.requests_file(bad)
    _write_as_sampler(f, _struct_of(pq.read_table(f), names, group), telemetry=False)
    _redo_done(paths, bad)
    _refused(paths, good, bad, reason)
