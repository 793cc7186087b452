"""Bad cell outputs: each gives a named reason, never a traceback or a wrong number."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import SweepPaths, read_json, write_done
from orchestrator.reduce import read_invalid, reduce_sweep, validate_cell, validate_cells
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan

SPEC = CellSpec(seconds=6.0, warmup_s=1.0, power_w=150.0, n_responses=8)


def _sweep(tmp_path: Path, n: int = 2) -> tuple[SweepPaths, list[str]]:
    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=2, seed=i) for i in range(n)]
    ids = write_plan(paths, params)
    for p in params:
        write_cell(paths, p, SPEC)
    return paths, ids


def _redo_done(paths: SweepPaths, cid: str, drop: str | None = None) -> None:
    """Rewrite DONE.json over the files as they are now (a worker that hashed bad files)."""
    done = read_json(paths.done_marker(cid))
    files = {rel: e["rows"] for rel, e in done["files"].items() if rel != drop}
    for rel in files:
        try:
            files[rel] = pq.read_metadata(paths.cell_dir(cid) / rel).num_rows
        except Exception:  # noqa: BLE001 - a broken file keeps its old row count
            pass
    extra = {k: v for k, v in done.items() if k not in ("files", "cell_id", "schema_version", "finished_unix_s")}
    write_done(paths, cid, files, extra)


def _bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)
    _bump_mtime(path)


def _assert_only_good_cell_reduced(paths: SweepPaths, good: str, bad: str, reason: str) -> None:
    table = reduce_sweep(paths.root)
    assert table.column("cell_id").to_pylist() == [good]
    row = table.to_pylist()[0]
    assert row["energy_j"] == pytest.approx(150.0 * 5.0 * 2)
    invalid = dict(read_invalid(paths.root))
    assert set(invalid) == {bad}
    assert reason in invalid[bad]
    assert not (paths.results_dir / "telemetry" / f"cell_id={bad}").exists()


def test_good_cells_are_valid(tmp_path):
    paths, ids = _sweep(tmp_path)
    assert all(v.ok and v.reason is None for v in validate_cells(paths, ids).values())


def test_truncated_parquet_after_done_is_a_checksum_mismatch(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 1)
    f.write_bytes(f.read_bytes()[:-100])
    v = validate_cell(paths, bad)
    assert not v.ok and v.reason == "checksum mismatch in telemetry/rank-1.parquet"
    _assert_only_good_cell_reduced(paths, good, bad, "checksum mismatch")


def test_truncated_parquet_hashed_by_the_worker_has_no_valid_footer(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 0)
    f.write_bytes(f.read_bytes()[:-100])
    _redo_done(paths, bad)
    v = validate_cell(paths, bad)
    assert v.reason.startswith("not a valid Parquet file telemetry/rank-0.parquet")
    _assert_only_good_cell_reduced(paths, good, bad, "not a valid Parquet file")


def test_flipped_bytes_are_a_checksum_mismatch(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 0)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert validate_cell(paths, bad).reason == "checksum mismatch in telemetry/rank-0.parquet"
    _assert_only_good_cell_reduced(paths, good, bad, "checksum mismatch")


def test_missing_shard_file(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    paths.telemetry_file(bad, 1).unlink()
    assert validate_cell(paths, bad).reason == "missing file telemetry/rank-1.parquet"
    _assert_only_good_cell_reduced(paths, good, bad, "missing file")


def test_shard_never_written_is_missing_rank(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    paths.telemetry_file(bad, 1).unlink()
    _redo_done(paths, bad, drop="telemetry/rank-1.parquet")
    assert validate_cell(paths, bad).reason == "missing telemetry for rank 1 of 2"
    _assert_only_good_cell_reduced(paths, good, bad, "missing telemetry for rank 1")


def test_shard_copied_from_another_cell(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    shutil.copy(paths.telemetry_file(good, 1), paths.telemetry_file(bad, 1))
    _bump_mtime(paths.telemetry_file(bad, 1))
    assert validate_cell(paths, bad).reason == "checksum mismatch in telemetry/rank-1.parquet"
    _redo_done(paths, bad)  # even when the checksums were taken over the copied file
    assert validate_cell(paths, bad).reason == "telemetry/rank-1.parquet holds rows of another cell"
    _assert_only_good_cell_reduced(paths, good, bad, "rows of another cell")


def test_rank_file_copied_within_the_cell(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    shutil.copy(paths.telemetry_file(bad, 0), paths.telemetry_file(bad, 1))
    _bump_mtime(paths.telemetry_file(bad, 1))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "telemetry/rank-1.parquet holds rows of another rank"


def test_extra_column(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 0)
    t = pq.read_table(f)
    _rewrite(f, t.append_column("bonus", pa.array([1.0] * t.num_rows)))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "unexpected column bonus in telemetry/rank-0.parquet"
    _assert_only_good_cell_reduced(paths, good, bad, "unexpected column bonus")


def test_column_of_the_wrong_type(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 1)
    t = pq.read_table(f)
    i = t.schema.get_field_index("power_w")
    _rewrite(f, t.set_column(i, "power_w", t.column(i).cast(pa.string())))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "column power_w in telemetry/rank-1.parquet is string, expected double"
    _assert_only_good_cell_reduced(paths, good, bad, "column power_w")


@pytest.mark.parametrize("moved, found, belongs", [
    (["energy_j", "power_w"], "sm_util_pct", "power_w"),
    (["phase", "source"], "power_w", "phase"),
])
def test_columns_out_of_order_on_every_rank(tmp_path, moved, found, belongs):
    """The right columns in another order, on every rank alike: columns are
    read by position, so the cell is refused by name, not read into the wrong
    names (two swapped doubles; phase, which is read as a dictionary by its
    position, moved away)."""
    paths, (good, bad) = _sweep(tmp_path)
    for rank in (0, 1):
        f = paths.telemetry_file(bad, rank)
        t = pq.read_table(f)
        _rewrite(f, t.select([n for n in t.schema.names if n not in moved] + moved))
    _redo_done(paths, bad)
    reason = f"columns of telemetry/rank-0.parquet are out of order: {found} where {belongs} belongs"
    assert validate_cell(paths, bad).reason == reason
    _assert_only_good_cell_reduced(paths, good, bad, "out of order")


def test_missing_column(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.requests_file(bad)
    _rewrite(f, pq.read_table(f).drop_columns(["output_words"]))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "missing column output_words in requests/rank-0.parquet"


def test_empty_requests_file(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.requests_file(bad)
    _rewrite(f, pq.read_table(f).slice(0, 0))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "empty requests file requests/rank-0.parquet"
    _assert_only_good_cell_reduced(paths, good, bad, "empty requests file")


def test_unreadable_done_json(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    paths.done_marker(bad).write_text("{not json")
    assert validate_cell(paths, bad).reason == "DONE.json unreadable: JSONDecodeError"
    _assert_only_good_cell_reduced(paths, good, bad, "DONE.json unreadable")


def test_telemetry_without_measured_window(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 0)
    t = pq.read_table(f)
    _rewrite(f, t.replace_schema_metadata({b"wattsweep": json.dumps({"phases": []}).encode()}))
    _redo_done(paths, bad)
    assert validate_cell(paths, bad).reason == "no measured window in telemetry/rank-0.parquet"


def test_not_done_cell_is_not_valid_and_not_listed_as_invalid(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    paths.done_marker(bad).unlink()
    assert validate_cell(paths, bad).reason == "DONE.json missing"
    assert reduce_sweep(paths.root).num_rows == 1
    assert read_invalid(paths.root) == []  # pending/failed cells belong to `status`, not invalid.csv


def test_sweep_with_no_done_cells(tmp_path, capsys):
    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(seed=i) for i in range(2)]
    write_plan(paths, params)
    write_cell(paths, params[0], SPEC, done=False)
    table = reduce_sweep(paths.root)
    assert table.num_rows == 0 and "energy_j" in table.column_names
    assert cli_main(["reduce", str(paths.root)]) == 1
    err = capsys.readouterr().err
    assert "no done cells" in err and "Traceback" not in err


def test_missing_sweep_folder_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["reduce", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"wattsweep reduce: no sweep folder at {tmp_path / 'nope'}"


def test_cache_is_used_and_invalidated_by_a_change(tmp_path, monkeypatch):
    paths, (good, bad) = _sweep(tmp_path)
    assert validate_cell(paths, bad).ok
    cache = json.loads((paths.results_dir / ".validation-cache.json").read_text())
    assert cache["cells"][bad]["ok"] is True
    import orchestrator.reduce.validate as v

    calls = []
    real = v.check_cell
    monkeypatch.setattr(v, "check_cell", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert validate_cell(paths, bad).ok and calls == []  # from the cache
    f = paths.telemetry_file(bad, 0)
    data = bytearray(f.read_bytes())
    data[100] ^= 0x01
    f.write_bytes(bytes(data))
    _bump_mtime(f)
    assert validate_cell(paths, bad).reason == "checksum mismatch in telemetry/rank-0.parquet"
    assert calls == [bad]


def test_world_size_from_plan_when_done_lacks_it(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    done = read_json(paths.done_marker(bad))
    done.pop("world_size")
    paths.done_marker(bad).write_text(json.dumps(done))
    paths.telemetry_file(bad, 1).unlink()
    _redo_done(paths, bad, drop="telemetry/rank-1.parquet")
    assert validate_cell(paths, bad).reason == "missing telemetry for rank 1 of 2"  # shards=2 from plan.jsonl


def test_cache_key_is_taken_while_the_files_are_read(tmp_path, monkeypatch):
    """The key a check gathers equals a stat of every file, also when the
    check stops early (later files are stat'ed, not read), so both valid and
    invalid verdicts are reused until a file changes."""
    import orchestrator.reduce.validate as v
    from orchestrator.reduce.cache import stat_key

    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 0)
    data = bytearray(f.read_bytes())
    data[50] ^= 0x01
    f.write_bytes(bytes(data))
    verdicts = validate_cells(paths, [good, bad])
    assert verdicts[good].ok and verdicts[bad].reason == "checksum mismatch in telemetry/rank-0.parquet"
    cache = json.loads((paths.results_dir / ".validation-cache.json").read_text())["cells"]
    assert cache[good]["key"] == stat_key(paths, good) and cache[bad]["key"] == stat_key(paths, bad)
    reduce_sweep(paths.root)
    cache = json.loads((paths.results_dir / ".validation-cache.json").read_text())["cells"]
    assert cache[good]["key"] == stat_key(paths, good) and cache[bad]["key"] == stat_key(paths, bad)
    calls = []
    monkeypatch.setattr(v, "check_cell", lambda *a, **k: calls.append(a[1]))
    assert validate_cells(paths, [good, bad]) == verdicts and calls == []


def test_row_count_that_is_not_a_number(tmp_path):
    paths, (good, bad) = _sweep(tmp_path)
    done = read_json(paths.done_marker(bad))
    done["files"]["requests/rank-0.parquet"]["rows"] = "many"
    paths.done_marker(bad).write_text(json.dumps(done))
    assert validate_cell(paths, bad).reason.startswith("row count of requests/rank-0.parquet is 8, DONE.json says many")
    _assert_only_good_cell_reduced(paths, good, bad, "DONE.json says many")


@pytest.mark.parametrize("arrow_type, shown", [
    (pa.large_string(), "large_string"),
    (pa.dictionary(pa.int32(), pa.string()), "dictionary<values=string, indices=int32, ordered=0>"),
])
def test_string_column_stored_as_another_arrow_type(tmp_path, arrow_type, shown):
    """A string column stored as another Arrow type of the same Parquet type is
    retyped: both the reducer and validate_cells name it."""
    paths, (good, bad) = _sweep(tmp_path)
    f = paths.telemetry_file(bad, 1)
    t = pq.read_table(f)
    i = t.schema.get_field_index("host")
    _rewrite(f, t.set_column(i, "host", t.column(i).cast(arrow_type)))
    _redo_done(paths, bad)
    reason = f"column host in telemetry/rank-1.parquet is {shown}, expected string"
    assert validate_cell(paths, bad).reason == reason
    _assert_only_good_cell_reduced(paths, good, bad, reason)


def test_file_without_a_stored_arrow_schema_is_judged_by_its_parquet_schema(tmp_path):
    """A writer that stores no Arrow schema (not pyarrow): the types come from
    the Parquet schema, the metadata from the file's key-value metadata."""
    paths, (good, other) = _sweep(tmp_path)
    f = paths.telemetry_file(other, 0)
    t = pq.read_table(f)
    with pq.ParquetWriter(f, t.schema.remove_metadata(), store_schema=False) as w:
        w.write_table(t)
        w.add_key_value_metadata({b"wattsweep": t.schema.metadata[b"wattsweep"]})
    _bump_mtime(f)
    _redo_done(paths, other)
    assert b"ARROW:schema" not in pq.read_metadata(f).metadata
    assert validate_cell(paths, other).ok
    rows = {r["cell_id"]: r for r in reduce_sweep(paths.root).to_pylist()}
    assert rows[other]["energy_j"] == pytest.approx(rows[good]["energy_j"])
