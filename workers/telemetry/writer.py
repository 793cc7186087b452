"""Column buffers for telemetry rows and the atomic Parquet writer."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.contracts import TELEMETRY_META_KEY, TELEMETRY_SCHEMA, atomic_write_bytes, telemetry_parquet_bytes


@dataclass
class TelemetryRows:
    """Rows kept as columns: appending a sample is a handful of list appends."""

    cell_id: str
    host: str
    rank: int
    gpu_index: int
    gpu_uuid: str
    source: str
    timestamp_ns: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    power_w: list[float | None] = field(default_factory=list)
    energy_j: list[float | None] = field(default_factory=list)
    sm_util_pct: list[float | None] = field(default_factory=list)
    mem_util_pct: list[float | None] = field(default_factory=list)
    mem_used_bytes: list[int | None] = field(default_factory=list)
    sm_clock_mhz: list[float | None] = field(default_factory=list)
    temperature_c: list[float | None] = field(default_factory=list)
    power_limit_w: list[float | None] = field(default_factory=list)

    def append(self, timestamp_ns: int, phase: str, s: Any, energy_j: float | None) -> None:
        self.timestamp_ns.append(timestamp_ns)
        self.phase.append(phase)
        self.power_w.append(s.power_w)
        self.energy_j.append(energy_j)
        self.sm_util_pct.append(s.sm_util_pct)
        self.mem_util_pct.append(s.mem_util_pct)
        self.mem_used_bytes.append(s.mem_used_bytes)
        self.sm_clock_mhz.append(s.sm_clock_mhz)
        self.temperature_c.append(s.temperature_c)
        self.power_limit_w.append(s.power_limit_w)

    def to_table(self) -> pa.Table:
        n = len(self.timestamp_ns)
        cols = {
            "cell_id": [self.cell_id] * n,
            "host": [self.host] * n,
            "rank": [self.rank] * n,
            "gpu_index": [self.gpu_index] * n,
            "gpu_uuid": [self.gpu_uuid] * n,
            "timestamp_ns": self.timestamp_ns,
            "phase": self.phase,
            "power_w": self.power_w,
            "energy_j": self.energy_j,
            "sm_util_pct": self.sm_util_pct,
            "mem_util_pct": self.mem_util_pct,
            "mem_used_bytes": self.mem_used_bytes,
            "sm_clock_mhz": self.sm_clock_mhz,
            "temperature_c": self.temperature_c,
            "power_limit_w": self.power_limit_w,
            "source": [self.source] * n,
        }
        return pa.table(cols, schema=TELEMETRY_SCHEMA)


def write_telemetry(path: Path, rows: TelemetryRows | pa.Table, meta: dict[str, Any]) -> int:
    """Write rows with ``meta`` (JSON) under TELEMETRY_META_KEY: temp name, fsync, rename."""
    table = rows.to_table() if isinstance(rows, TelemetryRows) else rows.cast(TELEMETRY_SCHEMA)
    table = table.replace_schema_metadata({TELEMETRY_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    atomic_write_bytes(path, telemetry_parquet_bytes(table))
    return table.num_rows


def read_telemetry_meta(path: Path) -> dict[str, Any]:
    """The metadata dict of a telemetry file ({} when absent)."""
    md = pq.read_schema(path).metadata or {}
    raw = md.get(TELEMETRY_META_KEY)
    return json.loads(raw) if raw else {}
