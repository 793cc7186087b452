"""The sampler against fake backends, including a replay of a real NVML recording."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.contracts import TELEMETRY_META_KEY, TELEMETRY_SCHEMA
from orchestrator.reduce.metrics import integrate_power_j
from workers.gpu.base import GpuInfo, GpuLostError, GpuSample
from workers.telemetry import Sampler
from conftest import SHARED_DATA

RECORDING = SHARED_DATA / "nvml" / "h200-matmul-timeline.csv"
T0_NS = 1_800_000_000_000_000_000


class ReplayBackend:
    """Plays the H200 recording back ``speed`` times faster than real time.

    Timestamps are in recording time, so the sampler's rows line up with the
    recorded energy counter: 10 Hz of recording time = ``10 * speed`` Hz real.
    """

    name = "replay"
    source = "replay"
    observe_only = True

    def __init__(self, speed: float = 5.0, *, counter: bool = True, power_source: str = "instant") -> None:
        if not RECORDING.is_file():
            pytest.skip(f"the NVML recording {RECORDING} is absent on this machine")
        rows = list(csv.DictReader(RECORDING.open()))
        self.t = [float(r["t"]) - float(rows[0]["t"]) for r in rows]
        self.instant_w = [int(r["power_instant_mW"]) / 1000 for r in rows]
        self.energy_j_rec = [int(r["energy_mJ"]) / 1000 for r in rows]
        self.speed = speed
        self.counter = counter
        self.power_source = power_source
        self.start = time.monotonic()
        self.energy_calls = 0
        self.energy_reads: list[tuple[float, float]] = []  # (recording time, counter J)
        self.activity: list[tuple[str, float]] = []

    def now_s(self) -> float:
        return min((time.monotonic() - self.start) * self.speed, self.t[-1])

    def _at(self, t_s: float) -> int:
        return max(0, bisect_right(self.t, t_s) - 1)

    def devices(self):
        return [GpuInfo(0, "GPU-replay", "NVIDIA H200 (replay)", 141 << 30, 200.0, 700.0, 700.0)]

    def sample(self, index: int) -> GpuSample:
        t = self.now_s()
        i = self._at(t)
        return GpuSample(T0_NS + int(t * 1e9), self.instant_w[i], 50.0, 20.0, 1 << 30, 1900.0, 40.0, 700.0)

    def energy_j(self, index: int):
        self.energy_calls += 1
        if not self.counter:
            return None
        t = self.now_s()
        value = self.energy_j_rec[self._at(t)]
        time.sleep(0.0035)  # NVML's counter read costs ~3.5 ms on an H200
        self.energy_reads.append((t, value))
        return value

    def recorded_energy_between(self, t0_s: float, t1_s: float) -> float:
        return self.energy_j_rec[self._at(t1_s)] - self.energy_j_rec[self._at(t0_s)]

    def note_activity(self, index: int, phase: str, load: float) -> None:
        self.activity.append((phase, load))

    def close(self) -> None:
        pass


def _sampler(backend, hz=50.0, energy_hz=5.0) -> Sampler:
    return Sampler(backend, 0, cell_id="c0ffee000001", host="node-0", rank=0, gpu_uuid="GPU-replay", hz=hz, energy_hz=energy_hz)


def _run_replay(tmp_path: Path, backend: ReplayBackend) -> tuple[Path, int]:
    s = _sampler(backend)
    s.start()
    time.sleep(0.1)
    s.mark("warmup", load=0.5)
    time.sleep(0.05)
    s.window_start()
    s.mark("decode", load=1.0)
    time.sleep(1.3)  # ~6.5 s of the 7.56 s recording
    s.window_end()
    s.mark("idle")
    s.stop()
    path = tmp_path / "telemetry" / "rank-0.parquet"
    return path, s.write(path, {"slurm": {"job_id": None}})


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    backend = ReplayBackend()
    path, rows = _run_replay(tmp_path_factory.mktemp("replay"), backend)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[TELEMETRY_META_KEY])
    return backend, path, rows, table, meta


def test_file_has_the_contract_schema_and_metadata(replayed):
    _, path, rows, table, meta = replayed
    assert table.schema.equals(TELEMETRY_SCHEMA, check_metadata=False)
    assert rows == table.num_rows > 0
    for key in ("window_start_ns", "window_end_ns", "energy_start_j", "energy_end_j", "phases",
                "power_source", "gpu_name", "sample_period_s", "slurm"):
        assert key in meta, key
    assert meta["gpu_name"] == "NVIDIA H200 (replay)"
    assert meta["power_source"] == "instant"
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


def test_window_energy_comes_from_the_counter_relative_to_start(replayed):
    backend, _, _, table, meta = replayed
    base_t, base_j = backend.energy_reads[0]
    relative = {round(v - base_j, 6): t for t, v in backend.energy_reads}
    for key, ts_key in (("energy_start_j", "window_start_ns"), ("energy_end_j", "window_end_ns")):
        # the stored value is a counter reading minus the first reading, taken
        # right after the window's power sample (same instant up to the read's cost)
        t_read = relative[round(meta[key], 6)]
        assert abs(t_read - (meta[ts_key] - T0_NS) / 1e9) < 0.25
    counter_j = meta["energy_end_j"] - meta["energy_start_j"]
    # relative to the sampler's start: the first reading is 0 J
    first = table.column("energy_j").drop_null()[0].as_py()
    assert first == 0.0
    assert counter_j > 1000  # the window covers the full-load part of the recording


def test_integrated_instant_power_agrees_with_counter_within_5_percent(replayed):
    _, _, _, table, meta = replayed
    ts = table.column("timestamp_ns").to_numpy()
    p = table.column("power_w").to_numpy()
    integrated = integrate_power_j(ts, p, meta["window_start_ns"], meta["window_end_ns"])
    counter_j = meta["energy_end_j"] - meta["energy_start_j"]
    assert abs(integrated - counter_j) / counter_j < 0.05


def test_rows_are_tagged_with_phases_and_marks_read_the_counter(replayed):
    backend, _, _, table, meta = replayed
    phases = table.column("phase").to_pylist()
    assert phases[0] == "load"
    assert {"load", "warmup", "decode", "idle"} <= set(phases)
    # phases appear in order, never interleaved
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order == ["load", "warmup", "decode", "idle"]
    # each phase gets a counter reading right after its boundary (read by the
    # sampler thread, so the worker's mark never waits for it)
    firsts = [i for i, p in enumerate(phases) if i > 0 and phases[i - 1] != p]
    energy = table.column("energy_j")
    for start in firsts:
        assert any(energy[i].is_valid for i in range(start, min(start + 3, len(phases)))
                   if phases[i] == phases[start])
    assert [p["phase"] for p in meta["phases"]] == ["load", "warmup", "decode", "idle"]
    assert all(p["end_ns"] >= p["start_ns"] for p in meta["phases"])
    assert backend.activity == [("warmup", 0.5), ("decode", 1.0), ("idle", 0.0)]


def test_power_cadence_and_energy_rate(replayed):
    backend, _, _, table, meta = replayed
    ts = table.column("timestamp_ns").to_numpy()
    gaps_real_s = np.diff(ts) / 1e9 / backend.speed
    duration_real_s = (ts[-1] - ts[0]) / 1e9 / backend.speed
    assert len(ts) >= 0.7 * duration_real_s * 50  # 50 Hz asked; a busy machine may drop a few ticks
    assert np.median(gaps_real_s) == pytest.approx(0.02, rel=0.3)
    energy_rows = table.column("energy_j").drop_null()
    # ~5 Hz from the thread + start/marks/window bounds/stop; never every row
    assert 3 <= len(energy_rows) <= duration_real_s * 5 + 12
    assert len(energy_rows) < table.num_rows / 3
    assert np.all(np.diff(energy_rows.to_numpy()) >= 0)


def test_card_without_energy_counter_writes_null_energy(tmp_path):
    backend = ReplayBackend(speed=20, counter=False, power_source="average")
    s = _sampler(backend, hz=20, energy_hz=2)
    s.start()
    s.window_start()
    time.sleep(0.2)
    s.window_end()
    s.stop()
    s.write(tmp_path / "t.parquet", {})
    t = pq.read_table(tmp_path / "t.parquet")
    meta = json.loads(t.schema.metadata[TELEMETRY_META_KEY])
    assert t.column("energy_j").null_count == t.num_rows
    assert meta["energy_start_j"] is None and meta["energy_end_j"] is None
    assert meta["has_energy_counter"] is False
    assert meta["power_source"] == "average"
    assert backend.energy_calls == 1  # probed once at start, then never again


class LosingBackend(ReplayBackend):
    """Falls off the bus after a few samples."""

    def __init__(self, after: int) -> None:
        super().__init__(speed=20)
        self.left = after

    def sample(self, index: int) -> GpuSample:
        self.left -= 1
        if self.left < 0:
            raise GpuLostError("GPU 0 stopped answering")
        return super().sample(index)


def test_lost_gpu_stops_the_thread_and_is_reported(tmp_path):
    s = _sampler(LosingBackend(after=5), hz=100)
    s.start()
    time.sleep(0.3)
    s.stop()  # must not raise or hang
    assert s.error and "GpuLostError" in s.error
    assert s.write(tmp_path / "t.parquet", {}) == s.rows >= 1
    meta = json.loads(pq.read_table(tmp_path / "t.parquet").schema.metadata[TELEMETRY_META_KEY])
    assert "stopped answering" in meta["sampler_error"]


def test_slow_rates_are_refused():
    with pytest.raises(ValueError, match="at least 10 Hz"):
        _sampler(ReplayBackend(), hz=2)


def test_marks_are_safe_from_another_thread(tmp_path):
    backend = ReplayBackend(speed=10)
    s = _sampler(backend, hz=200, energy_hz=20)
    s.start()
    threads = [threading.Thread(target=lambda: [s.mark("decode") for _ in range(50)]) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.stop()
    n = s.write(tmp_path / "t.parquet", {})
    t = pq.read_table(tmp_path / "t.parquet")
    assert n == t.num_rows >= 101
    assert np.all(np.diff(t.column("timestamp_ns").to_numpy()) >= 0)


def test_login_side_modules_never_import_torch():
    code = ("import sys, workers.telemetry, orchestrator.reduce, orchestrator.reduce.cmd, orchestrator.report, "
            "orchestrator.report.cmd, orchestrator.report.compare_cmd; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sampler_and_synthetic_files_store_no_arrow_schema_and_keep_the_metadata(tmp_path):
    """Both writers go through one function: the types come from the Parquet
    schema (no ARROW:schema key, the cheaper file to open), the wattsweep key
    is in the footer, and the file reads back with TELEMETRY_SCHEMA."""
    from orchestrator.contracts import SweepPaths
    from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell
    from workers.telemetry.writer import write_telemetry

    paths = SweepPaths.of(tmp_path / "sweep")
    cid = write_cell(paths, cell_params(shards=1), CellSpec(seconds=2.0, warmup_s=1.0))
    synthetic = paths.telemetry_file(cid, 0)
    sampler = tmp_path / "sampler.parquet"
    write_telemetry(sampler, pq.read_table(synthetic), {"window_start_ns": 1, "window_end_ns": 2})
    for f in (synthetic, sampler):
        kv = pq.read_metadata(f).metadata
        assert b"ARROW:schema" not in kv and TELEMETRY_META_KEY in kv
        assert pq.read_table(f).schema.remove_metadata().equals(TELEMETRY_SCHEMA)
    assert json.loads(pq.read_metadata(sampler).metadata[TELEMETRY_META_KEY]) == {"window_start_ns": 1, "window_end_ns": 2}


def test_phase_marks_leave_the_counter_read_to_the_sampler_thread(tmp_path):
    """A per-batch mark sits on the worker's decode path: it must not wait for the
    ~3.5 ms counter read; the thread reads the counter right after it instead."""
    import threading

    backend = ReplayBackend(speed=1.0)
    readers: list[str] = []
    original = backend.energy_j

    def energy_j(index):
        readers.append(threading.current_thread().name)
        return original(index)

    backend.energy_j = energy_j
    s = _sampler(backend, hz=10.0, energy_hz=1.0)
    s.start()
    main = threading.current_thread().name
    before = readers.count(main)
    for i in range(10):
        s.mark("prefill" if i % 2 == 0 else "decode", load=1.0)
        time.sleep(0.02)
    marks_on_main = readers.count(main) - before
    s.window_start()  # window bounds stay exact: read on the caller's thread
    s.stop()
    assert marks_on_main == 0
    assert readers.count(main) == before + 2  # window_start, and the closing reading of stop()
    assert sum(1 for r in readers if r != main) >= 5  # the thread served the marks
