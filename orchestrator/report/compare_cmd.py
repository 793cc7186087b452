"""`wattsweep compare SWEEP_A SWEEP_B`: ratios B/A of matching cells."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Side-by-side metrics of the cells of two sweeps that share the same
parameters, with the ratio B/A (for example an H200 sweep against an H100 one,
or one power cap against another). Cells match on every measurement parameter
except gpu_kind and those --ignore names, or on exactly those --match-on names.
The flags column holds the flags of either cell of a pair (docs/metrics.md), and a
note under the table says what they mean. The last line counts the cells of each
sweep that found no partner."""

EPILOG = """examples:
  wattsweep compare sweeps/h100 sweeps/h200                       same cells, other card
  wattsweep compare sweeps/cap250 sweeps/cap150 --ignore power_cap_w
  wattsweep compare A B --match-on model,shards,batch_size --csv ratios.csv
  wattsweep compare S S --ignore power_cap_w --where-a power_cap_w=null --where-b power_cap_w=150
                                                                  one sweep: cap 150 W against uncapped

exit status: 0 at least one pair of matching cells; 1 a file could not be read or
written (such as the --csv path); 2 no matching cells (the line says why, also when
a sweep has no done cell with valid outputs), not a sweep folder, a damaged plan or
summary, an unknown key, metric or filter, two cells of one side on the same keys,
or a bad option."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_a", metavar="SWEEP_A", help="the reference sweep (denominator)")
    parser.add_argument("sweep_b", metavar="SWEEP_B", help="the sweep compared with it (numerator)")
    parser.add_argument("--match-on", help="comma-separated parameters that must be equal (default: all but --ignore)")
    parser.add_argument("--ignore", help="comma-separated parameters not matched, besides gpu_kind (never matched "
                                         "unless --match-on names it)")
    parser.add_argument("--metrics", help="comma-separated numeric summary columns to compare "
                                          "(default: tokens_per_s,words_per_s,energy_per_token_j,"
                                          "energy_per_response_j,mean_power_w,latency_p50_s)")
    parser.add_argument("--where-a", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only A's cells with this parameter value (repeatable; null for none)")
    parser.add_argument("--where-b", action="append", default=[], metavar="KEY=VALUE",
                        help="keep only B's cells with this parameter value (repeatable)")
    parser.add_argument("--csv", metavar="PATH", help="also write the comparison as CSV")


def run(args: argparse.Namespace) -> int:
    from orchestrator.reduce import ReduceError
    from orchestrator.reduce.plan_io import PlanFileError
    from orchestrator.reduce.table import format_rows
    from orchestrator.report.compare import DEFAULT_METRICS, CompareError, compare_sweeps, parse_where
    from orchestrator.report.data import ReportError

    split = lambda s: [x for x in (s or "").split(",") if x]  # noqa: E731
    try:
        table = compare_sweeps(args.sweep_a, args.sweep_b, match_on=split(args.match_on) or None,
                               ignore=split(args.ignore), metrics=split(args.metrics) or DEFAULT_METRICS,
                               where_a=parse_where(args.where_a), where_b=parse_where(args.where_b))
    except (CompareError, PlanFileError, ReportError, ReduceError) as e:
        print(f"wattsweep compare: {e}", file=sys.stderr)
        return 2
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("simulated"):
        print(f"note: simulated telemetry in sweep {meta['simulated']}: ratios compare models, not cards")
    cols = [c for c in table.column_names if not c.endswith(("_a", "_b")) or c in ("cell_a", "cell_b")]
    print(format_rows(cols, list(zip(*[table.column(c).to_pylist() for c in cols]))))
    if meta.get("flags_note"):
        print(f"note: {meta['flags_note']}")
    print(f"{table.num_rows} matching cells; unmatched: {meta.get('unmatched_a')} of A, {meta.get('unmatched_b')} of B; "
          f"ratio = B/A; matched on {meta.get('match_on')}")
    if args.csv:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, args.csv)
        print(f"wrote {args.csv}")
    return 0
