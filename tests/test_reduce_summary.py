"""Summary numbers against known answers, flags, determinism, compacted telemetry."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import TELEMETRY_META_KEY, SweepPaths, read_json, write_done
from orchestrator.reduce import SUMMARY_SCHEMA, format_table, open_telemetry, reduce_sweep
from orchestrator.reduce.metrics import integrate_power_j, max_gap_s
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan

ISSUE_COLUMNS = (
    "cell_id model weights shards nodes batch_size power_cap_w dataset gpu_name n_responses input_tokens output_tokens "
    "output_words duration_s tokens_per_s words_per_s responses_per_s energy_j mean_power_w energy_per_token_j "
    "energy_per_response_j sm_util_pct mem_util_pct telemetry_source integrated_energy_j cross_check_err_pct "
    "cap_binding max_gap_s latency_p50_s latency_p90_s latency_p99_s flags energy_method"
).split()


def _one(tmp_path, spec: CellSpec = CellSpec(seconds=11.0, warmup_s=1.0), **params):
    paths = SweepPaths.of(tmp_path / "sweep")
    p = cell_params(**params)
    write_plan(paths, [p])
    cid = write_cell(paths, p, spec)
    return paths, cid


def test_known_answers_and_identities(tmp_path):
    spec = CellSpec(seconds=11.0, warmup_s=1.0, power_w=200.0, n_responses=40, tokens_per_response=250, words_per_response=180)
    paths, cid = _one(tmp_path, spec, shards=4, batch_size=8)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert set(ISSUE_COLUMNS) <= set(row)
    assert row["duration_s"] == pytest.approx(10.0)
    assert row["energy_j"] == pytest.approx(200.0 * 10.0 * 4)
    assert row["energy_method"] == "counter"
    assert row["mean_power_w"] == pytest.approx(800.0)
    assert row["mean_power_per_gpu_w"] == pytest.approx(200.0)
    assert row["output_tokens"] == 40 * 250 and row["output_words"] == 40 * 180 and row["n_responses"] == 40
    assert row["tokens_per_s"] * row["duration_s"] == pytest.approx(row["output_tokens"])
    assert row["energy_j"] == pytest.approx(row["mean_power_w"] * row["duration_s"])
    assert row["energy_per_token_j"] == pytest.approx(8000.0 / 10000)
    assert row["energy_per_response_j"] == pytest.approx(8000.0 / 40)
    assert row["words_per_s"] == pytest.approx(720.0) and row["responses_per_s"] == pytest.approx(4.0)
    assert row["cross_check_err_pct"] == pytest.approx(0.0, abs=1e-9)
    assert row["shards"] == 4 and row["nodes"] == 1 and row["weights"] == "random"
    assert row["telemetry_source"] == "synthetic" and row["flags"] == "" and row["cap_binding"] is None
    assert row["sm_util_pct"] == pytest.approx(80.0) and row["mem_util_pct"] == pytest.approx(40.0)
    # latency: responses end evenly over the window, all started at its start
    assert row["latency_p50_s"] == pytest.approx(np.percentile(np.arange(1, 41) * 10.0 / 40, 50))


def test_no_counter_falls_back_to_integrated_power(tmp_path):
    paths, cid = _one(tmp_path, CellSpec(seconds=11.0, warmup_s=1.0, power_w=100.0, ripple_w=20.0, has_counter=False), shards=2)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["energy_method"] == "integrated"
    assert row["energy_j"] == pytest.approx(row["integrated_energy_j"])
    assert row["energy_j"] == pytest.approx(2 * 100.0 * 10.0, rel=0.02)
    assert row["cross_check_err_pct"] is None


def test_ripple_cross_check_is_small(tmp_path):
    paths, cid = _one(tmp_path, CellSpec(seconds=11.0, warmup_s=1.0, power_w=100.0, ripple_w=30.0), shards=2)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert abs(row["cross_check_err_pct"]) < 0.5 and "cross_check" not in row["flags"]


def _tamper(paths, cid, rank, fn):
    """Rewrite a rank file through fn(table, meta) and re-hash DONE.json."""
    f = paths.telemetry_file(cid, rank)
    t = pq.read_table(f)
    meta = json.loads(t.schema.metadata[TELEMETRY_META_KEY])
    t, meta = fn(t, meta)
    pq.write_table(t.replace_schema_metadata({TELEMETRY_META_KEY: json.dumps(meta).encode()}), f)
    done = read_json(paths.done_marker(cid))
    files = {rel: e["rows"] for rel, e in done["files"].items()}
    files[f"telemetry/rank-{rank}.parquet"] = t.num_rows
    write_done(paths, cid, files, {k: done[k] for k in ("world_size", "nodes", "gpu_name", "weights", "telemetry_source")})


def test_cross_check_flag(tmp_path):
    paths, cid = _one(tmp_path, shards=1)
    _tamper(paths, cid, 0, lambda t, m: (t, {**m, "energy_end_j": m["energy_end_j"] * 1.2}))
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["cross_check_err_pct"] < -5 and row["flags"] == "cross_check"


def test_gap_flag(tmp_path):
    paths, cid = _one(tmp_path, shards=2)

    def drop_middle(t, m):
        keep = np.ones(t.num_rows, bool)
        keep[40:50] = False  # 1 s hole at 10 Hz
        return t.filter(pa.array(keep)), m

    _tamper(paths, cid, 1, drop_middle)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["max_gap_s"] == pytest.approx(1.1) and row["flags"] == "gap"


@pytest.mark.parametrize("cap, binding", [(250.0, False), (205.0, True)])
def test_cap_binding(tmp_path, cap, binding):
    paths, cid = _one(tmp_path, CellSpec(seconds=11.0, warmup_s=1.0, power_w=200.0), power_cap_w=cap)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["cap_binding"] is binding
    assert ("cap_not_binding" in row["flags"]) is (not binding)


def test_reducing_twice_gives_the_same_bytes(tmp_path):
    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=s, batch_size=b) for s in (1, 2) for b in (1, 4)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0, ripple_w=5.0))

    def snapshot():
        return {str(p.relative_to(paths.results_dir)): p.read_bytes()
                for p in sorted(paths.results_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")}

    reduce_sweep(paths.root)
    first = snapshot()
    reduce_sweep(paths.root)
    assert snapshot() == first
    assert {"summary.parquet", "summary.csv", "invalid.csv"} <= set(first)
    assert sum(k.startswith("telemetry/cell_id=") for k in first) == 4


def test_summary_schema_and_order(tmp_path):
    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=s, power_cap_w=c) for s in (2, 1) for c in (150, None)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0))
    reduce_sweep(paths.root)
    t = pq.read_table(paths.summary_parquet)
    assert t.schema.equals(SUMMARY_SCHEMA, check_metadata=False)
    assert list(zip(t.column("shards").to_pylist(), t.column("power_cap_w").to_pylist())) == [
        (1, None), (1, 150.0), (2, None), (2, 150.0)]
    csv_lines = paths.summary_csv.read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith('"cell_id"')


def test_compacted_telemetry_holds_every_row(tmp_path):
    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0), shards=3)
    reduce_sweep(paths.root)
    t = open_telemetry(paths.root).to_table()
    assert t.num_rows == 3 * 31
    assert set(t.column("cell_id").to_pylist()) == {cid}
    assert sorted(set(t.column("rank").to_pylist())) == [0, 1, 2]
    assert t.column("host").to_pylist()[0] == "node-0"


def test_stale_partition_removed_when_cell_turns_invalid(tmp_path):
    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0), shards=1)
    reduce_sweep(paths.root)
    part = paths.results_dir / "telemetry" / f"cell_id={cid}"
    assert part.exists()
    paths.telemetry_file(cid, 0).write_bytes(b"garbage")
    assert reduce_sweep(paths.root).num_rows == 0
    assert not part.exists()


def test_integration_edges_are_interpolated():
    ts = np.array([0, 1_000_000_000, 2_000_000_000], dtype=np.int64)
    p = np.array([100.0, 200.0, 100.0])
    # window [0.5 s, 1.5 s]: 150 -> 200 -> 150 W
    assert integrate_power_j(ts, p, 500_000_000, 1_500_000_000) == pytest.approx(175.0)
    assert integrate_power_j(ts, np.array([np.nan, np.nan, np.nan]), 0, 10) == 0.0
    assert max_gap_s(ts, 0, 2_500_000_000) == pytest.approx(1.0)


def test_format_table_and_cli(tmp_path, capsys):
    paths, cid = _one(tmp_path, shards=2)
    table = reduce_sweep(paths.root)
    text = format_table(table)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["cell_id", "model", "shards"] and cid in lines[2]
    assert format_table(table.slice(0, 0)) == "(no cells)"
    assert cli_main(["reduce", str(paths.root), "--columns", "cell_id,energy_j"]) == 0
    out = capsys.readouterr().out
    assert "4,000" in out and "1 cells reduced, 0 invalid" in out
    # simulated rows are said to be so under the table, whichever columns are shown
    i = table.column_names.index("telemetry_source")
    for source, noted in (("nvml-instant", False), ("simulated", True)):
        t = table.set_column(i, "telemetry_source", pa.array([source] * table.num_rows, pa.string()))
        note = format_table(t, ["cell_id", "energy_j"]).splitlines()[-1]
        assert note.startswith("simulated: 1 of 1 row(s)") == noted, note


def test_whole_cell_integration_matches_the_per_rank_definition():
    from orchestrator.reduce.integrate import window_integrals
    from orchestrator.reduce.metrics import CellTelemetry, rank_windows

    rng = np.random.default_rng(7)
    tables, metas = [], []
    for rank in range(4):
        n = 50 + 10 * rank
        ts = np.cumsum(rng.integers(50_000_000, 150_000_000, n)).astype(np.int64)
        if rank == 2:
            ts[20:] += 900_000_000  # a gap inside the window
        p = rng.uniform(50, 300, n)
        ws, we = int(ts[3] + 12_345), int(ts[-4] - 999)
        if rank == 3:
            ws, we = int(ts[0] - 10**9), int(ts[-1] + 10**9)  # window beyond the samples: edges clamp
        tables.append(pa.table({"timestamp_ns": ts, "power_w": p}))
        metas.append({"window_start_ns": ws, "window_end_ns": we})
    cell = CellTelemetry.of(tables, [0, 1, 2, 3], metas)
    ts_all = cell.table.column("timestamp_ns").to_numpy()
    p_all = cell.table.column("power_w").to_numpy()
    energies, gaps = window_integrals(ts_all, p_all, rank_windows(cell))
    for i, (t, m) in enumerate(zip(tables, metas)):
        ts, p = t.column("timestamp_ns").to_numpy(), t.column("power_w").to_numpy()
        assert energies[i] == pytest.approx(integrate_power_j(ts, p, m["window_start_ns"], m["window_end_ns"]), rel=1e-12)
        assert gaps[i] == pytest.approx(max_gap_s(ts, m["window_start_ns"], m["window_end_ns"]), rel=1e-12)
    assert gaps[2] > 0.9


def test_unchanged_cells_are_reused_and_changed_ones_recomputed(tmp_path, monkeypatch):
    import orchestrator.reduce.summary as summary

    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(seed=i) for i in range(3)]
    ids = write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0))
    first = reduce_sweep(paths.root)
    calls = []
    real = summary.reduce_cell
    monkeypatch.setattr(summary, "reduce_cell", lambda p, cid, *a: calls.append(cid) or real(p, cid, *a))
    assert reduce_sweep(paths.root).equals(first) and calls == []
    write_cell(paths, params[1], CellSpec(seconds=3.0, warmup_s=1.0, power_w=100.0))  # rerun: new files
    again = reduce_sweep(paths.root)
    assert calls == [ids[1]]
    energy = dict(zip(again.column("cell_id").to_pylist(), again.column("energy_j").to_pylist()))
    assert energy[ids[1]] == pytest.approx(200.0) and energy[ids[0]] == pytest.approx(400.0)
    monkeypatch.setattr(summary, "REDUCE_VERSION", "other")
    reduce_sweep(paths.root)
    assert sorted(calls[1:]) == sorted(ids)


def test_percentiles_match_numpy():
    from orchestrator.reduce.metrics import percentiles

    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 64, 4801):
        a = rng.normal(size=n)
        assert percentiles(a, (50.0, 90.0, 99.0)) == pytest.approx(list(np.percentile(a, [50, 90, 99])), rel=1e-12)


def test_results_are_readable_by_the_group(tmp_path):
    import os
    import stat

    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0))
    old = os.umask(0o022)
    try:
        reduce_sweep(paths.root)
    finally:
        os.umask(old)
    for f in (paths.summary_parquet, paths.summary_csv, paths.results_dir / "invalid.csv",
              paths.results_dir / "telemetry" / f"cell_id={cid}" / "part-0.parquet"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_worker_processes_give_the_same_summary_as_inline(tmp_path, monkeypatch):
    import orchestrator.reduce.parallel as parallel

    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=2, seed=i) for i in range(4)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0, ripple_w=7.0))
    inline = reduce_sweep(paths.root)
    (paths.results_dir / ".validation-cache.json").unlink()
    monkeypatch.setattr(parallel, "MIN_ITEMS_FOR_PROCESSES", 1)
    assert reduce_sweep(paths.root).equals(inline)


def test_counter_going_backwards_falls_back_to_integration(tmp_path):
    paths, cid = _one(tmp_path, shards=2)
    _tamper(paths, cid, 1, lambda t, m: (t, {**m, "energy_end_j": m["energy_start_j"] - 5.0}))
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["energy_method"] == "mixed" and row["cross_check_err_pct"] is None
    assert row["energy_j"] == pytest.approx(2 * 200.0 * 10.0)


def test_compacted_files_follow_the_umask_and_leave_no_temporary_files(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0), shards=2)
        reduce_sweep(paths.root)
        reduce_sweep(paths.root)  # again: the partition is reused or replaced, never doubled
    finally:
        os.umask(old)
    part = paths.results_dir / "telemetry" / f"cell_id={cid}"
    assert sorted(p.name for p in part.iterdir()) == ["part-0.parquet"]
    assert (part / "part-0.parquet").stat().st_mode & 0o777 == 0o640


def test_kv_cache_dtype_column_and_plans_written_before_it(tmp_path):
    """The summary names each cell's KV-cache dtype; a plan written before the parameter
    existed (no kv_cache_dtype in its params) reads as "auto"."""
    paths = SweepPaths.of(tmp_path / "sweep")
    old = cell_params(batch_size=8)  # the synthetic planner writes no kv_cache_dtype
    assert "kv_cache_dtype" not in old
    new = cell_params(batch_size=8, kv_cache_dtype="float8_e4m3fn")
    write_plan(paths, [old, new])
    ids = [write_cell(paths, p) for p in (old, new)]
    rows = {r["cell_id"]: r for r in reduce_sweep(paths.root).to_pylist()}
    assert rows[ids[0]]["kv_cache_dtype"] == "auto"
    assert rows[ids[1]]["kv_cache_dtype"] == "float8_e4m3fn"
    assert SUMMARY_SCHEMA.field("kv_cache_dtype").type == pa.string()


def test_compacted_file_has_the_telemetry_schema_and_the_ranks_metadata(tmp_path):
    """A reader gets the documented types (TELEMETRY_SCHEMA less cell_id) and each rank's metadata."""
    from orchestrator.contracts import TELEMETRY_SCHEMA

    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0), shards=2)
    reduce_sweep(paths.root)
    f = paths.results_dir / "telemetry" / f"cell_id={cid}" / "part-0.parquet"
    t = pq.read_table(f)
    assert t.schema.remove_metadata().equals(pa.schema([x for x in TELEMETRY_SCHEMA if x.name != "cell_id"]))
    meta = json.loads(t.schema.metadata[TELEMETRY_META_KEY])
    assert [r["rank"] for r in meta["ranks"]] == [0, 1] and all("window_start_ns" in r for r in meta["ranks"])
    assert t.column("gpu_uuid").to_pylist()[::31] == ["GPU-synthetic-0", "GPU-synthetic-1"]
    assert set(t.column("phase").to_pylist()) == {"load", "warmup", "decode"}


def test_cache_is_plain_sorted_json(tmp_path):
    from orchestrator.reduce.validate import CACHE_VERSION

    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(seed=i) for i in range(3)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0))
    reduce_sweep(paths.root)
    text = (paths.results_dir / ".validation-cache.json").read_text()
    parsed = json.loads(text)
    assert parsed["version"] == CACHE_VERSION and len(parsed["cells"]) == 3
    assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":"))


def test_chunks_shrink_to_one_item_at_the_end():
    from orchestrator.reduce.parallel import MAX_CHUNK, chunk_sizes

    for n_items, n_workers in ((1000, 2), (70, 2), (64, 16), (5, 2)):
        sizes = chunk_sizes(n_items, n_workers)
        assert sum(sizes) == n_items and max(sizes) <= MAX_CHUNK
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert chunk_sizes(1000, 2)[0] == MAX_CHUNK and chunk_sizes(0, 2) == []


def test_whole_cell_integration_at_the_edges():
    """Windows before, after and between samples, on a sample, empty or
    reversed: the whole-cell version gives the per-rank definitions' numbers.
    (Not repeated timestamps: np.interp, in the definition, is undefined there.)"""
    from orchestrator.reduce.integrate import window_integrals
    from orchestrator.reduce.metrics import CellTelemetry, rank_windows

    rng = np.random.default_rng(11)
    for trial in range(300):
        tables, metas = [], []
        for rank in range(int(rng.integers(1, 5))):
            n = int(rng.integers(2, 25))
            steps = rng.integers(1, 3, n) * 50_000_000 if trial % 2 else rng.integers(1, 150_000_000, n)
            # Small times: the per-rank definitions difference times as floats.
            ts = (10**9 + np.cumsum(steps)).astype(np.int64)
            p = rng.uniform(50, 300, n)
            lo, hi = int(ts[0]) - 10**9, int(ts[-1]) + 10**9
            ws = int(rng.choice([rng.integers(lo, hi), ts[rng.integers(0, n)]]))
            we = int(rng.choice([rng.integers(lo, hi), ts[rng.integers(0, n)], ws + int(rng.integers(0, 10**9))]))
            tables.append(pa.table({"timestamp_ns": ts, "power_w": p}))
            metas.append({"window_start_ns": ws, "window_end_ns": we})
        cell = CellTelemetry.of(tables, list(range(len(tables))), metas)
        ts_all, p_all = cell.table.column("timestamp_ns").to_numpy(), cell.table.column("power_w").to_numpy()
        fast = window_integrals(ts_all, p_all, rank_windows(cell))
        assert fast is not None
        for i, (t, m) in enumerate(zip(tables, metas)):
            ts, p = t.column("timestamp_ns").to_numpy(), t.column("power_w").to_numpy()
            ws, we = m["window_start_ns"], m["window_end_ns"]
            assert fast[0][i] == pytest.approx(integrate_power_j(ts, p, ws, we), rel=1e-9, abs=1e-9)
            assert fast[1][i] == pytest.approx(max_gap_s(ts, ws, we), rel=1e-12)


def test_reduce_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    import gc

    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0))
    assert gc.get_freeze_count() == 0
    reduce_sweep(paths.root)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # a caller's own freeze stays
    try:
        frozen = gc.get_freeze_count()
        reduce_sweep(paths.root)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    """Under Slurm or in a container the process may use fewer CPUs than the machine has."""
    import os

    from orchestrator.reduce.parallel import worker_count

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert worker_count() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5}, raising=False)
    assert worker_count() == 4


def _source_rows(paths, cid, shards):
    from orchestrator.contracts import TELEMETRY_SCHEMA

    names = [f.name for f in TELEMETRY_SCHEMA if f.name != "cell_id"]
    return pa.concat_tables([pq.read_table(paths.telemetry_file(cid, r)).select(names) for r in range(shards)])


@pytest.mark.parametrize("rewrite", ["statistics", "no_statistics", "host_varies"])
def test_compacted_rows_equal_the_source_rows(tmp_path, rewrite):
    """Identity columns (host, rank, gpu_index, gpu_uuid, source) are rebuilt
    from footer statistics when those prove them constant, decoded otherwise:
    either way the compacted rows are the source rows."""
    paths, cid = _one(tmp_path, CellSpec(seconds=3.0, warmup_s=1.0), shards=2)

    def change(t, m):
        if rewrite == "host_varies":
            hosts = ["node-0"] * (t.num_rows - 1) + ["node-9"]
            t = t.set_column(t.schema.get_field_index("host"), "host", pa.array(hosts))
        return t, m

    _tamper(paths, cid, 1, change)
    if rewrite == "no_statistics":
        f = paths.telemetry_file(cid, 1)
        t = pq.read_table(f)
        pq.write_table(t, f, write_statistics=False)
        assert pq.read_metadata(f).row_group(0).column(1).statistics is None
        done = read_json(paths.done_marker(cid))
        write_done(paths, cid, {rel: e["rows"] for rel, e in done["files"].items()},
                   {k: done[k] for k in ("world_size", "nodes", "gpu_name", "weights", "telemetry_source")})
    assert reduce_sweep(paths.root).num_rows == 1
    got = pq.read_table(paths.results_dir / "telemetry" / f"cell_id={cid}" / "part-0.parquet")
    want = _source_rows(paths, cid, 2)
    assert got.replace_schema_metadata(None).equals(want.replace_schema_metadata(None))
    if rewrite == "host_varies":
        assert got.column("host").to_pylist()[-1] == "node-9"


def test_short_window_flag(tmp_path):
    """A window under 5 s is flagged: the energy counter's 100 ms steps are a large part of it."""
    paths, _ = _one(tmp_path, CellSpec(seconds=4.0, warmup_s=1.0), shards=1)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["duration_s"] < 5.0 and row["flags"] == "short_window"


def test_phase_mask_over_dictionary_and_plain_chunks():
    """The decode-row mask: shared or differing dictionaries, null rows never a hit."""
    from orchestrator.reduce.metrics import _equals

    d1 = pa.DictionaryArray.from_arrays(pa.array([0, 1, None, 2], pa.int32()), pa.array(["load", "decode", "warmup"]))
    same = pa.DictionaryArray.from_arrays(pa.array([1, 1], pa.int32()), pa.array(["load", "decode", "warmup"]))
    other = pa.DictionaryArray.from_arrays(pa.array([1, 0], pa.int32()), pa.array(["decode", "load"]))
    assert _equals(pa.chunked_array([d1, same]), "decode").tolist() == [False, True, False, False, True, True]
    assert _equals(pa.chunked_array([d1, other]), "decode").tolist() == [False, True, False, False, False, True]
    assert _equals(pa.chunked_array([pa.array(["decode", None, "load"])]), "decode").tolist() == [True, False, False]
    assert _equals(pa.chunked_array([], pa.string()), "decode").tolist() == []


# -- cap_binding: the GPUs reach the cap (mean within 5% or p99 within 2%) ----


@pytest.mark.parametrize("mean_w, p99_w, binding", [
    (190.01, 100.0, True),   # mean just inside 5% of a 200 W cap
    (189.99, 195.99, False),  # mean just outside, p99 just outside 2%: never near the cap
    (100.0, 196.01, True),   # p99 just inside 2%: the GPUs sat at the cap part of the time
    (100.0, 195.99, False),
    (210.0, 210.0, True),    # above the cap (averaging, a limit the card rounds up)
    (None, 196.01, True),    # a reading missing: the other decides
    (189.99, None, False),
])
def test_cap_binding_rule_on_both_sides_of_each_threshold(mean_w, p99_w, binding):
    from orchestrator.reduce.metrics import cap_binding

    assert cap_binding(200.0, mean_w, p99_w) is binding


def test_cap_binding_is_null_without_a_cap_or_readings():
    from orchestrator.reduce.metrics import cap_binding

    assert cap_binding(None, 300.0, 300.0) is None
    assert cap_binding(200.0, None, None) is None


@pytest.mark.parametrize("power_w, ripple_w, binding", [
    (142.0, 8.0, True),  # the user study's cell: mean 142 W under a 150 W cap, p99 at the cap
    (140.0, 5.0, False),  # p99 ~145 W < 147 W and mean 140 W < 142.5 W: the cap never reached
])
def test_cap_that_the_gpus_reach_binds_though_the_mean_is_below_it(tmp_path, power_w, ripple_w, binding):
    spec = CellSpec(seconds=11.0, warmup_s=1.0, power_w=power_w, ripple_w=ripple_w)
    paths, _ = _one(tmp_path, spec, shards=2, power_cap_w=150)
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["mean_power_per_gpu_w"] < 150 * 0.95
    assert (row["gpu_power_p99_w"] >= 150 * 0.98) is binding
    assert row["cap_binding"] is binding
    assert ("cap_not_binding" in row["flags"]) is (not binding)


def test_rows_cached_by_the_previous_reducer_version_are_recomputed(tmp_path):
    """Version 3 computed cap_binding from the mean alone and slurm_job_id without
    the array task: its cached rows must not be reused."""
    import hashlib

    from orchestrator.reduce.cache import cache_path

    paths, cid = _one(tmp_path, CellSpec(seconds=11.0, warmup_s=1.0, power_w=142.0, ripple_w=8.0), power_cap_w=150)
    reduce_sweep(paths.root)
    raw = json.loads(cache_path(paths).read_text())
    entry = raw["cells"][cid]
    entry["reduced"] = "3:" + hashlib.sha256(",".join(SUMMARY_SCHEMA.names).encode()).hexdigest()[:8]
    entry["row"] = {**entry["row"], "cap_binding": False, "flags": "cap_not_binding"}
    cache_path(paths).write_text(json.dumps(raw))
    row = reduce_sweep(paths.root).to_pylist()[0]
    assert row["cap_binding"] is True and row["flags"] == ""


# -- slurm_job_id: the cell's own job ------------------------------------------


def _with_slurm(paths, cid, slurm):
    done = read_json(paths.done_marker(cid))
    write_done(paths, cid, {rel: e["rows"] for rel, e in done["files"].items()},
               {**{k: done[k] for k in ("world_size", "nodes", "gpu_name", "weights", "telemetry_source")},
                "slurm": slurm})


@pytest.mark.parametrize("slurm, job", [
    ({"job_id": "35", "array_task_id": "0", "raw_job_id": "36"}, "35_0"),  # an array task
    ({"job_id": "35", "array_task_id": "12", "raw_job_id": "48"}, "35_12"),
    ({"job_id": "41", "array_task_id": None, "raw_job_id": "41"}, "41"),  # a plain job (multi-node cell)
    ({"job_id": 41}, "41"),  # a marker without the task field
    ({"job_id": None, "array_task_id": None}, None),  # off Slurm
])
def test_slurm_job_id_names_the_array_task(tmp_path, slurm, job):
    paths, cid = _one(tmp_path)
    _with_slurm(paths, cid, slurm)
    assert reduce_sweep(paths.root).to_pylist()[0]["slurm_job_id"] == job


# -- planned cells without a result ---------------------------------------------


def _sweep_with_holes(tmp_path):
    """shards 1, 2 and 4 planned (and one infeasible cell): shards=1 done, shards=2
    failed (FAILED.json), shards=4 never ran."""
    from orchestrator.contracts import atomic_write_json, cell_id_of

    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=s) for s in (1, 2, 4)] + [cell_params(shards=8)]
    ids = write_plan(paths, params)
    lines = paths.plan_jsonl.read_text().splitlines()
    last = json.loads(lines[-1])
    lines[-1] = json.dumps({**last, "feasible": False, "reason": "does not fit"}, sort_keys=True)
    paths.plan_jsonl.write_text("\n".join(lines) + "\n")
    write_cell(paths, params[0], CellSpec(seconds=11.0, warmup_s=1.0))
    atomic_write_json(paths.failed_marker(cell_id_of(params[1])), {"error": "CUDA out of memory"})
    return paths, ids


def test_reduce_counts_planned_cells_without_a_result(tmp_path, capsys, monkeypatch):
    import subprocess

    def no_slurm(*a, **k):
        raise AssertionError("reduce must not ask Slurm")

    monkeypatch.setattr(subprocess, "run", no_slurm)
    monkeypatch.setattr(subprocess, "Popen", no_slurm)
    paths, _ = _sweep_with_holes(tmp_path)
    assert cli_main(["reduce", str(paths.root), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("1 cells reduced, 0 invalid")
    assert out[1] == (f"2 of 3 planned cells have no result yet (1 failed (FAILED.json); 1 with no marker: "
                      f"timed out, pending, running or never run); `wattsweep status {paths.root} --state "
                      "failed,cancelled,timeout,missing,planned,pending,running,unknown` lists them")


def test_reduce_prints_no_such_line_when_every_planned_cell_has_a_result(tmp_path, capsys):
    paths, _ = _one(tmp_path)
    assert cli_main(["reduce", str(paths.root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "1 cells reduced" in out and "no result" not in out


def test_no_result_count_reads_only_the_markers(tmp_path):
    from orchestrator.reduce.coverage import coverage

    paths, ids = _sweep_with_holes(tmp_path)
    cov = coverage(paths.root)
    assert (cov.planned, cov.no_result, cov.with_failed_marker) == (3, (ids[1], ids[2]), 1)
    write_cell(paths, cell_params(shards=2), CellSpec(seconds=11.0, warmup_s=1.0))  # resubmitted, done
    assert coverage(paths.root).message().startswith(
        "1 of 3 planned cells has no result yet (1 with no marker: timed out, pending, running or never run)")


def test_no_result_count_names_cells_wattsweep_cancel_stopped(tmp_path):
    from orchestrator.reduce.coverage import coverage
    from orchestrator.submit.base import SubmissionRecord, append_submissions
    from orchestrator.submit.cancellations import append_cancellation

    paths, ids = _sweep_with_holes(tmp_path)  # ids[1] failed, ids[2] never ran
    append_submissions(paths, [SubmissionRecord((ids[1], ids[2]), "slurm", ("9_0", "9_1"), True, 1.0, 0, {})])
    append_cancellation(paths, {ids[1]: "9_0", ids[2]: "9_1"})
    assert coverage(paths.root).message().startswith("2 of 3 planned cells have no result yet (2 cancelled)")


def test_the_state_filter_named_by_reduce_lists_every_cell_without_a_result():
    from orchestrator.reduce.coverage import NO_RESULT_STATES
    from orchestrator.status.state import STATES

    # every state but those of a cell with DONE.json (done, invalid) or none planned to run
    assert set(NO_RESULT_STATES.split(",")) == set(STATES) - {"done", "invalid", "infeasible"}


def test_a_cap_the_cards_did_not_enforce_is_flagged(tmp_path):
    """A cell's cap pulled mid-run (a restore from another host), or recorded in
    observe mode, read as a clean capped measurement."""
    import numpy as np

    from orchestrator.reduce.metrics import cap_not_enforced

    assert not cap_not_enforced(None, np.array([300.0]))
    assert not cap_not_enforced(150.0, np.array([150.0, 151.0, np.nan]))
    assert cap_not_enforced(150.0, np.array([150.0, 300.0]))  # pulled mid-cell
    assert cap_not_enforced(300.0, np.array([700.0]))  # observe mode on a 700 W card
    assert not cap_not_enforced(150.0, np.array([np.nan]))  # no reading: nothing to judge
    paths = SweepPaths.of(tmp_path / "sweep")
    p = cell_params(power_cap_w=150.0)
    write_plan(paths, [p])
    cid = write_cell(paths, p, CellSpec(seconds=11.0, warmup_s=1.0, power_w=149.0))
    assert "cap_not_enforced" not in reduce_sweep(paths.root).to_pylist()[0]["flags"]
    _tamper(paths, cid, 0, lambda t, meta: (t.set_column(t.schema.get_field_index("power_limit_w"), "power_limit_w",
                                                         pa.array(np.full(t.num_rows, 300.0))), meta))
    assert "cap_not_enforced" in reduce_sweep(paths.root).to_pylist()[0]["flags"]
