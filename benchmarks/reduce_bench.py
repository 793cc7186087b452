"""Reducer benchmark: validate + reduce a synthetic sweep of 1,000 cells x 8 GPUs.

    python benchmarks/reduce_bench.py [--cells 1000] [--shards 8] [--hz 10] [--seconds 60] [--dir DIR]

Generates the sweep (not timed) unless DIR already holds one of that shape,
then times, each in a fresh process so that peak RSS is the step's own:
  1. validate_cells over every cell, cold (no validation cache);
  2. validate_cells again (cache hits: what `wattsweep status` pays);
  3. reduce_sweep from scratch (validate + summarise + compact telemetry);
  4. reduce_sweep again: nothing changed, so rows and partitions are reused
     (must give the same bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _generate(root: Path, cells: int, shards: int, hz: float, seconds: float) -> None:
    from orchestrator.reduce.synthetic import CellSpec, write_synthetic_sweep

    stamp = root / "bench-shape.json"
    # "format": how the files are written (contracts.telemetry_parquet_bytes); a
    # sweep written by an earlier version is generated again.
    shape = {"cells": cells, "shards": shards, "hz": hz, "seconds": seconds, "format": 2}
    if stamp.exists() and json.loads(stamp.read_text()) == shape:
        return
    t0 = time.perf_counter()
    write_synthetic_sweep(root, cells, shards=shards, spec=CellSpec(hz=hz, seconds=seconds, ripple_w=15.0))
    stamp.write_text(json.dumps(shape))
    print(f"generated {cells} cells x {shards} ranks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def _step(root: Path, step: str) -> dict:
    """One timed step in this process (called in a child)."""
    from orchestrator.contracts import SweepPaths
    from orchestrator.reduce import reduce_sweep, validate_cells
    from orchestrator.reduce.plan_io import read_plan_cells

    paths = SweepPaths.of(root)
    if step in ("validate-cold", "reduce"):
        shutil.rmtree(paths.results_dir, ignore_errors=True)  # cold: no cache, no earlier results
    t0 = time.perf_counter()
    c0, s0 = _cpu_s(), _sys_s()
    if step.startswith("validate"):
        ids = sorted(read_plan_cells(paths))
        verdicts = validate_cells(paths, ids)
        n_ok = sum(v.ok for v in verdicts.values())
    else:
        n_ok = reduce_sweep(root).num_rows
    dt = time.perf_counter() - t0
    cpu, sys_s = _cpu_s() - c0, _sys_s() - s0
    # Peak resident memory of this process and of the largest worker process.
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"step": step, "seconds": round(dt, 3), "cpu_s": round(cpu, 3), "sys_s": round(sys_s, 3), "valid_cells": n_ok,
            "peak_rss_mib": round(rss_mib, 1), "peak_worker_rss_mib": round(child_mib, 1)}


def _cpu_s() -> float:
    """User + system CPU of this process and its finished workers: a shared,
    busy machine stretches wall time more than the CPU a step needs (which
    still varies: docs/performance.md, "Reducer")."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _sys_s() -> float:
    """The kernel's share of _cpu_s: mostly file-system work. On an ext4 without
    a journal it grows when many files were deleted in the last minutes (the
    benchmark deletes the previous results before each cold step):
    docs/performance.md, "Reducer"."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_stime + kids.ru_stime


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    res = root / "results"
    for p in sorted(res.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            h.update(str(p.relative_to(res)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--dir", default="/tmp/wattsweep-reduce-bench")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    if args.step:
        print(json.dumps(_step(root, args.step)))
        return 0
    _generate(root, args.cells, args.shards, args.hz, args.seconds)
    rows = args.cells * args.shards * (int(args.hz * args.seconds) + 1)
    files = sum(1 for _ in (root / "cells").glob("*/*/*.parquet"))
    print(f"sweep: {args.cells} cells, {files} Parquet files, {rows:,} telemetry rows, cpus={os.cpu_count()}")
    digests = []
    for step in ("validate-cold", "validate-cached", "reduce", "reduce-again"):
        out = subprocess.run([sys.executable, __file__, "--dir", str(root), "--step", step],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out)
        if step.startswith("reduce"):
            digests.append(_digest(root))
            r["rows_per_s"] = f"{rows / r['seconds']:,.0f}"
        print(json.dumps(r))
    print(f"reduce outputs identical across runs: {digests[0] == digests[1]}")
    return 0 if digests[0] == digests[1] else 1


if __name__ == "__main__":
    sys.exit(main())
