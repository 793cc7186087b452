"""What the login node and the workers share, and nothing heavy.

Workers import only this module from ``orchestrator``. It must never import
torch, hydra or submitit at module level: the login-node CLI imports it too,
and a worker process imports it before torch is initialised.

Contents: the cell (its measurement parameters and content-hash id), the task
handed to a worker, the sweep folder's layout, the Parquet schemas, and the
marker files (DONE.json / FAILED.json).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pyarrow as pa

SCHEMA_VERSION = 1
TOOL_NAME = "wattsweep"

# ---------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CellParams:
    """The parameters that change a measurement. Their hash is the cell id.

    Run options that do not change what is measured (launcher, telemetry rate,
    the GPU backend used to apply the cap, folders) live in ``RunOptions``.
    """

    model: str  # model config name, e.g. "llama-7b"
    model_args: dict[str, Any]  # the shape: dim, n_layers, n_heads, n_kv_heads, vocab_size, ...
    weights: str  # "random" or a checkpoint folder path
    dtype: str  # "bfloat16" | "float16" | "float32"
    shards: int  # model-parallel size = GPUs = ranks
    batch_size: int
    power_cap_w: float | None  # None: leave the card's limit as it is
    dataset: str  # "synthetic" | "alpaca" | "gsm8k"
    dataset_path: str | None
    n_prompts: int
    max_prompt_tokens: int  # prompts are truncated to this many tokens
    max_new_tokens: int
    sort_by_length: bool
    tokenizer_path: str | None  # sentencepiece .model; None = byte-level fallback
    gpu_kind: str  # profile/card name the cell is planned for, e.g. "v100", "h100"
    seed: int
    # Parameters added later have a default that means "as before" and are left out of
    # the id while at it, so that cells planned before them keep their ids.
    kv_cache_dtype: str = "auto"  # "auto" (= dtype) | "float8_e4m3fn": 8-bit keys and values

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CellParams":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown cell parameters {sorted(unknown)}; valid: {sorted(fields)}")
        missing = [k for k, f in fields.items() if k not in d and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"cell parameters {sorted(missing)} missing")
        return cls(**{k: d[k] for k in fields if k in d})

    @property
    def cell_id(self) -> str:
        return cell_id_of(self.to_dict())


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace; floats that are whole become ints
    so that 150 and 150.0 hash the same."""

    def norm(x: Any) -> Any:
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, dict):
            return {str(k): norm(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [norm(v) for v in x]
        return x

    return json.dumps(norm(obj), sort_keys=True, separators=(",", ":"))


# Cell parameters added after the first planner, with their "as before" value: left
# out of the id at that value, and filled in where an older plan lacks them.
LATER_PARAM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CellParams)
                        if f.default is not dataclasses.MISSING}
# kv_cache_dtype values: "auto" keeps keys and values in the model dtype
KV_CACHE_DTYPES = ("auto", "float8_e4m3fn")


def cell_id_of(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the measurement parameters, 12 hex digits."""
    hashed = {k: v for k, v in params.items()
              if k not in LATER_PARAM_DEFAULTS or v != LATER_PARAM_DEFAULTS[k]}
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunOptions:
    """How a cell is run, without changing what it measures (not hashed)."""

    gpu_backend: str = "auto"  # auto | nvml | nvidia-smi | capctl | simulated
    gpu_profile: str = "v100"  # simulated card profile
    gpu_fail: str | None = None  # simulated failure: permission|range|mismatch|lost
    gpu_observe: bool = False  # read constraints and record what would be set; never write
    cap_tolerance_w: float = 1.0
    state_dir: str | None = None  # per-node folder for cap save files and the simulated card state
    site_ledger: str | None = None  # site-wide append-only cap ledger (JSON lines)
    policy_path: str | None = None
    telemetry_hz: float = 10.0
    energy_hz: float = 1.0
    warmup_batches: int = 1
    cuda_graph: bool = True
    fail_on_purpose: str | None = None  # tests: "raise" makes the worker raise after loading
    sleep_s: float = 0.0  # tests: extra seconds of decode-time sleep, to catch a cell running
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class CellTask:
    """What submitit pickles and a worker runs: one cell, all ranks call it.

    The class lives here (not in workers/) so that the login node can pickle it
    without importing torch; ``__call__`` imports the worker lazily.
    """

    sweep_dir: str
    cell_id: str
    params: CellParams
    options: RunOptions
    attempt: int = 0

    def __call__(self) -> dict[str, Any]:
        from workers.entry import run_cell  # lazy: torch only on the compute node

        return run_cell(self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on timeout/preemption: requeue the same cell clean."""
        import submitit  # lazy

        nxt = dataclasses.replace(self, attempt=self.attempt + 1)
        return submitit.helpers.DelayedSubmission(nxt)


# ---------------------------------------------------------------------------
# GPU card profiles: used by the planner (memory fit, cap range) and by the
# simulated backend (its cards). Real backends read the card itself.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuProfile:
    name: str
    memory_bytes: int
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float
    idle_power_w: float
    hbm_bandwidth_bytes_s: float  # datasheet, for rooflines and the simulated power model
    gpus_per_node: int = 8
    fp8: bool = False  # 8-bit float loads and conversions (compute capability 8.9+: Ada, Hopper)


GiB = 1 << 30
GPU_PROFILES: dict[str, GpuProfile] = {
    # V100 SXM2 32 GB as in the paper; range chosen so 250/175/150 W are valid.
    "v100": GpuProfile("Tesla V100-SXM2-32GB (simulated)", 32 * GiB, 100.0, 300.0, 300.0, 40.0, 0.9e12),
    "a100": GpuProfile("NVIDIA A100-SXM4-80GB (simulated)", 80 * GiB, 100.0, 400.0, 400.0, 55.0, 2.0e12),
    "h100": GpuProfile("NVIDIA H100 80GB HBM3 (simulated)", 80 * GiB, 200.0, 700.0, 700.0, 70.0, 3.35e12,
                       fp8=True),
    "h200": GpuProfile("NVIDIA H200 (simulated)", 141 * GiB, 200.0, 700.0, 700.0, 75.0, 4.8e12, fp8=True),
}


# ---------------------------------------------------------------------------
# The sweep folder
# ---------------------------------------------------------------------------


# The markers' names in a cell folder (SweepPaths.done_marker / failed_marker).
DONE_NAME = "DONE.json"
FAILED_NAME = "FAILED.json"


@dataclass(frozen=True)
class SweepPaths:
    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> "SweepPaths":
        return cls(Path(root))

    @property
    def sweep_yaml(self) -> Path:
        return self.root / "sweep.yaml"

    @property
    def plan_jsonl(self) -> Path:
        return self.root / "plan.jsonl"

    @property
    def submissions_jsonl(self) -> Path:
        """One line per submission: cell ids, launcher, job ids, time."""
        return self.root / "submissions.jsonl"

    @property
    def cells_dir(self) -> Path:
        return self.root / "cells"

    def cell_dir(self, cell_id: str) -> Path:
        return self.cells_dir / cell_id

    def launch_dir(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "launch"

    def telemetry_file(self, cell_id: str, rank: int) -> Path:
        return self.cell_dir(cell_id) / "telemetry" / f"rank-{rank}.parquet"

    def requests_file(self, cell_id: str, rank: int = 0) -> Path:
        return self.cell_dir(cell_id) / "requests" / f"rank-{rank}.parquet"

    def caps_ledger(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "caps.jsonl"

    def done_marker(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / DONE_NAME

    def failed_marker(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / FAILED_NAME

    def attempts_dir(self, cell_id: str) -> Path:
        """Where partial outputs of an earlier attempt are moved before a rerun."""
        return self.cell_dir(cell_id) / "attempts"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def summary_parquet(self) -> Path:
        return self.results_dir / "summary.parquet"

    @property
    def summary_csv(self) -> Path:
        return self.results_dir / "summary.csv"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"


# ---------------------------------------------------------------------------
# Parquet schemas
# ---------------------------------------------------------------------------

PHASES = ("load", "warmup", "prefill", "decode", "idle")

TELEMETRY_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("host", pa.string()),
        ("rank", pa.int32()),
        ("gpu_index", pa.int32()),
        ("gpu_uuid", pa.string()),
        ("timestamp_ns", pa.int64()),  # time.time_ns() on the node
        ("phase", pa.string()),  # one of PHASES
        ("power_w", pa.float64()),  # instant power
        ("energy_j", pa.float64()),  # energy counter since sampler start; null where not read
        ("sm_util_pct", pa.float64()),
        ("mem_util_pct", pa.float64()),
        ("mem_used_bytes", pa.int64()),
        ("sm_clock_mhz", pa.float64()),
        ("temperature_c", pa.float64()),
        ("power_limit_w", pa.float64()),
        ("source", pa.string()),  # "nvml" | "simulated" | ...
    ]
)

# Keys of the telemetry file's key-value metadata (JSON values, under b"wattsweep"):
#   window_start_ns, window_end_ns  measured window (device synchronised), rank clock
#   energy_start_j, energy_end_j    energy counter read at those two instants (null if no counter)
#   phases                          [{"phase", "start_ns", "end_ns"}, ...]
#   power_source                    "instant" | "average" (NVML field used for power_w)
#   gpu_name, sample_period_s, energy_period_s, has_energy_counter, sampler_error,
#   slurm {job_id, array_task_id, nodelist, hostname}, caps, weights, attempt
TELEMETRY_META_KEY = b"wattsweep"

# How every telemetry file is written (the sampler and synthetic sweeps alike).
# Statistics on, so that the reducer can trust the footer (cell_id and rank
# min/max prove a file belongs to its cell and rank without decoding it).
# Dictionary encoding only for the repeated strings: dictionary-encoded floats
# decode at half the speed, and a sweep's reduce is mostly decoding.
TELEMETRY_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "snappy",
    "write_statistics": True,
    "use_dictionary": ["cell_id", "host", "gpu_uuid", "phase", "source"],
}


def telemetry_parquet_bytes(table: pa.Table) -> bytes:
    """A telemetry table (TELEMETRY_SCHEMA, metadata under TELEMETRY_META_KEY)
    as Parquet file bytes, written as parquet_without_arrow_schema does: every
    column type maps one to one from the Parquet schema, and without the
    stored Arrow schema a reader opens and decodes each file about 15% faster
    (docs/performance.md, "Reducer")."""
    meta = (table.schema.metadata or {}).get(TELEMETRY_META_KEY)
    return parquet_without_arrow_schema(table, meta, **TELEMETRY_PARQUET_OPTIONS).to_pybytes()


def parquet_without_arrow_schema(table: pa.Table, meta: bytes | None, **options: Any) -> pa.Buffer:
    """``table`` as Parquet file bytes with no stored Arrow schema: readers take
    the types from the Parquet schema (so a dictionary array reads back as its
    values' type). Without that schema, schema metadata is not written on its
    own: ``meta`` goes under TELEMETRY_META_KEY in the footer directly."""
    import pyarrow.parquet as pq

    plain = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()  # C++ appends, no Python call per page
    with pq.ParquetWriter(sink, plain.schema, store_schema=False, **options) as writer:
        writer.write_table(plain)
        if meta is not None:
            writer.add_key_value_metadata({TELEMETRY_META_KEY: meta})
    return sink.getvalue()

REQUESTS_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("prompt_id", pa.int64()),
        ("batch_index", pa.int64()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("output_words", pa.int64()),
        ("start_ns", pa.int64()),
        ("end_ns", pa.int64()),
    ]
)

# ---------------------------------------------------------------------------
# Files: atomic writes, markers
# ---------------------------------------------------------------------------


def atomic_write_with(path: Path, write: Callable[[str], None], *, fsync: bool = True) -> None:
    """Let ``write(tmp_name)`` fill a temporary file in the same folder, then fsync
    and rename it over ``path``: readers see the old file or the new one, never half.
    The file gets the mode the user's umask allows (mkstemp alone gives 0600, wrong
    for a sweep folder a group shares)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write_with``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_with(path, write, fsync=fsync)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def slurm_context() -> dict[str, str | None]:
    """The Slurm facts a worker records in its outputs (None off Slurm)."""
    env = os.environ
    return {
        "job_id": env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "raw_job_id": env.get("SLURM_JOB_ID"),
        "nodelist": env.get("SLURM_JOB_NODELIST"),
        "hostname": socket.gethostname(),
        "user": env.get("SLURM_JOB_USER") or env.get("USER"),
        "account": env.get("SLURM_JOB_ACCOUNT"),
        "partition": env.get("SLURM_JOB_PARTITION"),
    }


def write_done(paths: SweepPaths, cell_id: str, files: Mapping[str, int], extra: Mapping[str, Any]) -> None:
    """DONE.json: each output file (relative to the cell folder) with rows and sha256."""
    cdir = paths.cell_dir(cell_id)
    entries = {rel: {"rows": int(rows), "sha256": sha256_file(cdir / rel)} for rel, rows in sorted(files.items())}
    atomic_write_json(
        paths.done_marker(cell_id),
        {
            "schema_version": SCHEMA_VERSION,
            "cell_id": cell_id,
            "finished_unix_s": time.time(),
            "files": entries,
            **dict(extra),
        },
    )


def write_failed(paths: SweepPaths, cell_id: str, error: str, traceback_text: str, extra: Mapping[str, Any] | None = None) -> None:
    atomic_write_json(
        paths.failed_marker(cell_id),
        {
            "schema_version": SCHEMA_VERSION,
            "cell_id": cell_id,
            "error": error,
            "traceback": traceback_text,
            "host": socket.gethostname(),
            "failed_unix_s": time.time(),
            "slurm": slurm_context(),
            **dict(extra or {}),
        },
    )


# caps.jsonl stays: the ledger is append-only across attempts.
OUTPUT_NAMES = ("telemetry", "requests", DONE_NAME, FAILED_NAME)


def move_aside_outputs(paths: SweepPaths, cell_id: str) -> Path | None:
    """Move an earlier attempt's outputs into ``attempts/<n>/`` so a rerun starts
    clean and nothing is lost. Returns the folder used, or None if nothing to move."""
    cdir = paths.cell_dir(cell_id)
    present = [cdir / n for n in OUTPUT_NAMES if (cdir / n).exists()]
    if not present:
        return None
    adir = paths.attempts_dir(cell_id)
    adir.mkdir(parents=True, exist_ok=True)
    n = 0
    while (adir / str(n)).exists():
        n += 1
    target = adir / str(n)
    target.mkdir()
    for src in present:
        os.replace(src, target / src.name)
    return target


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)
