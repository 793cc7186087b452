"""`wattsweep reduce SWEEP_DIR`: validate, summarise, print the table."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Validate every done cell of a sweep and write results/summary.parquet,
results/summary.csv (one row per valid cell), results/invalid.csv (cells whose
outputs failed validation, with the reason) and results/telemetry/ (telemetry
compacted, one partition per cell). Column definitions: docs/metrics.md."""

EPILOG = """examples:
  wattsweep reduce sweeps/2026-11-26-a
  wattsweep reduce sweeps/2026-11-26-a --columns cell_id,shards,tokens_per_s,energy_per_token_j

Planned cells without a result (no DONE.json: failed, cancelled, running or never
run) are counted on a line of their own; `wattsweep status` says which they are.

exit status: 0 at least one cell reduced (invalid cells or cells without a result
may remain; the lines say how many); 1 no done cell with valid outputs (the files
are still written), or a file of the folder could not be read or written; 2 not a
sweep folder, a damaged plan, an unknown --columns name or a bad option."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    parser.add_argument("--columns", help="comma-separated summary columns to print (default: the main ones; "
                                          "all are in results/summary.csv)")
    parser.add_argument("--quiet", action="store_true", help="write the files, print only the counts")
    parser.add_argument("--progress", action="store_true", help="print progress on stderr")


def run(args: argparse.Namespace) -> int:
    from orchestrator.contracts import SweepPaths
    from orchestrator.reduce import SUMMARY_SCHEMA, ReduceError, format_table, read_invalid, reduce_sweep
    from orchestrator.reduce.coverage import coverage
    from orchestrator.reduce.plan_io import PlanFileError, require_plan

    cols = [c for c in args.columns.split(",") if c] if args.columns else None
    unknown = [c for c in cols or () if c not in SUMMARY_SCHEMA.names]
    if unknown:
        print(f"wattsweep reduce: unknown column {unknown[0]!r}; valid: {', '.join(SUMMARY_SCHEMA.names)}", file=sys.stderr)
        return 2
    try:
        # The reducer itself skips damaged plan lines; the command refuses them as
        # `status` does, before it writes anything into the folder.
        plan = require_plan(SweepPaths.of(args.sweep_dir))
        table = reduce_sweep(args.sweep_dir, progress=args.progress)
    except (PlanFileError, ReduceError) as e:
        print(f"wattsweep reduce: {e}", file=sys.stderr)
        return 2
    invalid = read_invalid(args.sweep_dir)
    if not args.quiet and table.num_rows:
        print(format_table(table, cols))
    for cid, reason in invalid:
        print(f"invalid cell {cid}: {reason}", file=sys.stderr)
    print(f"{table.num_rows} cells reduced, {len(invalid)} invalid -> {args.sweep_dir}/results/summary.parquet")
    # Without this line a failed cell is invisible: the summary just lacks its row.
    no_result = coverage(args.sweep_dir, plan).message()
    if no_result:
        print(no_result)
    if table.num_rows == 0:
        print("wattsweep reduce: no done cells with valid outputs; see `wattsweep status`", file=sys.stderr)
        return 1
    return 0
