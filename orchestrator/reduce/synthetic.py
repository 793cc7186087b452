"""Synthetic sweep folders with known answers, for tests and the reducer benchmark.

The files are what a worker writes (telemetry per rank, requests, DONE.json with
checksums, plan.jsonl lines) but the numbers are made up: every row says
``source=synthetic`` so they can never be mistaken for a measurement.

Power per GPU is ``power_w`` (plus optional deterministic ripple) over the whole
recording, the energy counter is its exact integral, so a cell's expected
energy is ``power_w * window_s * shards``.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.contracts import (
    REQUESTS_SCHEMA, TELEMETRY_META_KEY, TELEMETRY_SCHEMA, CellParams, SweepPaths, atomic_write_bytes, cell_id_of,
    telemetry_parquet_bytes,
)

SOURCE = "synthetic"
T0_NS = 1_790_000_000_000_000_000  # a fixed epoch so files are byte-stable


def cell_params(**over: Any) -> dict[str, Any]:
    """A complete CellParams dict (llama-7b shape, random weights) with overrides."""
    p = {
        "model": "llama-7b",
        "model_args": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000},
        "weights": "random", "dtype": "bfloat16", "shards": 1, "batch_size": 8, "power_cap_w": None,
        "dataset": "synthetic", "dataset_path": None, "n_prompts": 64, "max_prompt_tokens": 128,
        "max_new_tokens": 256, "sort_by_length": False, "tokenizer_path": None, "gpu_kind": "v100", "seed": 0,
    }
    p.update(over)
    CellParams.from_dict(p)  # fail early on a typo in a test
    return p


@dataclass(frozen=True)
class CellSpec:
    """How a synthetic cell looks: rate, length, power and what it produced."""

    hz: float = 10.0
    seconds: float = 60.0
    warmup_s: float = 5.0  # load + warm-up before the window
    power_w: float = 200.0
    ripple_w: float = 0.0
    has_counter: bool = True
    n_responses: int = 64
    tokens_per_response: int = 256
    words_per_response: int = 190
    gpu_name: str = "Tesla V100-SXM2-32GB (synthetic)"
    sm_util_pct: float = 80.0
    mem_util_pct: float = 40.0


def write_plan(paths: SweepPaths, params_list: list[dict[str, Any]]) -> list[str]:
    lines, ids = [], []
    for p in params_list:
        cid = cell_id_of(p)
        ids.append(cid)
        lines.append(json.dumps({"id": cid, "params": p, "options": {}, "launcher": {"name": "local"}, "nodes": 1,
                                 "feasible": True, "reason": None}, sort_keys=True))
    atomic_write_bytes(paths.plan_jsonl, ("\n".join(lines) + "\n").encode())
    return ids


def write_cell(paths: SweepPaths, params: dict[str, Any], spec: CellSpec = CellSpec(), *, done: bool = True) -> str:
    """Write one cell's outputs (all ranks) and, unless done=False, its DONE.json."""
    from orchestrator.contracts import write_done

    cid = cell_id_of(params)
    shards = int(params["shards"])
    files: dict[str, int] = {}
    for rank in range(shards):
        rel = f"telemetry/rank-{rank}.parquet"
        # A capped cell's cards enforce its cap, as a real capped cell's do.
        table = telemetry_table(cid, rank, spec, limit_w=float(params.get("power_cap_w") or 300.0))
        atomic_write_bytes(paths.cell_dir(cid) / rel, telemetry_parquet_bytes(table))  # as the sampler writes it
        files[rel] = table.num_rows
    req = requests_table(cid, spec)
    _write(paths.requests_file(cid), req)
    files["requests/rank-0.parquet"] = req.num_rows
    if done:
        write_done(paths, cid, files, {"world_size": shards, "nodes": 1, "gpu_name": spec.gpu_name,
                                       "weights": params["weights"], "telemetry_source": SOURCE})
    return cid


def telemetry_table(cell_id: str, rank: int, spec: CellSpec, limit_w: float = 300.0) -> pa.Table:
    n = int(round(spec.seconds * spec.hz)) + 1
    t_s = np.arange(n) / spec.hz
    ts = T0_NS + np.round(t_s * 1e9).astype(np.int64)
    power = spec.power_w + spec.ripple_w * np.sin(2 * np.pi * 0.37 * t_s + rank)
    energy = np.concatenate(([0.0], np.cumsum((power[1:] + power[:-1]) * 0.5 / spec.hz)))
    # The counter is read ~1 Hz (and at the window bounds): null elsewhere.
    read = (np.arange(n) % max(1, int(spec.hz)) == 0) & spec.has_counter
    phase = np.where(t_s < spec.warmup_s, "warmup", "decode")
    phase[t_s < spec.warmup_s / 2] = "load"
    ws_i = int(round(spec.warmup_s * spec.hz))
    table = pa.table({
        "cell_id": pa.array([cell_id] * n), "host": pa.array(["node-0"] * n),
        "rank": pa.array(np.full(n, rank, np.int32)), "gpu_index": pa.array(np.full(n, rank % 8, np.int32)),
        "gpu_uuid": pa.array([f"GPU-synthetic-{rank}"] * n), "timestamp_ns": pa.array(ts),
        "phase": pa.array(phase.tolist()), "power_w": pa.array(power),
        "energy_j": pa.array(energy, mask=~read), "sm_util_pct": pa.array(np.full(n, spec.sm_util_pct)),
        "mem_util_pct": pa.array(np.full(n, spec.mem_util_pct)), "mem_used_bytes": pa.array(np.full(n, 14 << 30, np.int64)),
        "sm_clock_mhz": pa.array(np.full(n, 1380.0)), "temperature_c": pa.array(np.full(n, 55.0)),
        "power_limit_w": pa.array(np.full(n, limit_w)), "source": pa.array([SOURCE] * n),
    }, schema=TELEMETRY_SCHEMA)
    meta = {
        "window_start_ns": int(ts[ws_i]), "window_end_ns": int(ts[-1]),
        "energy_start_j": float(energy[ws_i]) if spec.has_counter else None,
        "energy_end_j": float(energy[-1]) if spec.has_counter else None,
        "phases": [{"phase": "decode", "start_ns": int(ts[ws_i]), "end_ns": int(ts[-1])}],
        "power_source": "instant", "gpu_name": spec.gpu_name, "sample_period_s": 1.0 / spec.hz,
    }
    return table.replace_schema_metadata({TELEMETRY_META_KEY: json.dumps(meta, sort_keys=True).encode()})


def requests_table(cell_id: str, spec: CellSpec) -> pa.Table:
    n = spec.n_responses
    start = T0_NS + int(spec.warmup_s * 1e9)
    dur_ns = int((spec.seconds - spec.warmup_s) * 1e9)
    ends = start + (np.arange(1, n + 1) * dur_ns) // max(n, 1)
    return pa.table({
        "cell_id": [cell_id] * n, "prompt_id": np.arange(n, dtype=np.int64), "batch_index": np.zeros(n, np.int64),
        "input_tokens": np.full(n, 128, np.int64), "output_tokens": np.full(n, spec.tokens_per_response, np.int64),
        "output_words": np.full(n, spec.words_per_response, np.int64), "start_ns": np.full(n, start, np.int64),
        "end_ns": ends.astype(np.int64),
    }, schema=REQUESTS_SCHEMA)


def write_synthetic_sweep(root: str | Path, n_cells: int, *, shards: int = 8, spec: CellSpec = CellSpec()) -> list[str]:
    """A sweep of n_cells done cells, each on ``shards`` GPUs (the benchmark's shape)."""
    paths = SweepPaths.of(root)
    params = [cell_params(shards=shards, seed=i, batch_size=1 << (i % 7)) for i in range(n_cells)]
    ids = write_plan(paths, params)
    for p in params:
        write_cell(paths, p, spec)
    return ids


def _write(path: Path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
