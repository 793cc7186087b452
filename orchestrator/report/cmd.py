"""`wattsweep report SWEEP_DIR [--format html|md]`."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """Write the sweep's report: report/index.html (opens from disk; PNG figures
beside it) and report/index.md, with the paper's figures and the table behind
each. Reduces the sweep first if it was never reduced, if a cell finished since the
last reduce, or with --reduce."""

EPILOG = """examples:
  wattsweep report sweeps/2026-11-26-a                 both pages
  wattsweep report sweeps/2026-11-26-a --format md     Markdown only, also printed here
  wattsweep report sweeps/2026-11-26-a --reduce        reduce again first

Planned cells without a result are counted near the top of the pages, and a figure
skipped or drawn without them names the planned values they would have supplied.
Figures and comparisons built from flagged cells carry a note on the flags.

exit status: 0 the report was written and shows at least one cell; 1 no done cell
with valid outputs (the pages are still written, saying so), or a file could not be
read or written; 2 not a sweep folder, a damaged plan, an unreadable summary, or a
bad option."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    parser.add_argument("--format", choices=("html", "md", "both"), default="both",
                        help="which page to write (default: both); md also prints it")
    parser.add_argument("--reduce", action="store_true", help="run `wattsweep reduce` first")


def run(args: argparse.Namespace) -> int:
    from orchestrator.contracts import SweepPaths
    from orchestrator.reduce import ReduceError
    from orchestrator.reduce.plan_io import PlanFileError, require_plan
    from orchestrator.report import ReportError, build_report, write_html, write_markdown

    try:
        require_plan(SweepPaths.of(args.sweep_dir))  # not a sweep, or a damaged plan: write no report/ into it
        report, out = build_report(args.sweep_dir, reduce_first=args.reduce)
    except (PlanFileError, ReportError, ReduceError) as e:
        print(f"wattsweep report: {e}", file=sys.stderr)
        return 2
    written = []
    if args.format in ("html", "both"):
        written.append(write_html(report, out))
    if args.format in ("md", "both"):
        md = write_markdown(report, out)
        written.append(md)
        if args.format == "md":
            print(md.read_text())
    for p in written:
        print(f"wrote {p}")
    if not report.summary_rows:
        print("wattsweep report: no done cells with valid outputs; the report is empty", file=sys.stderr)
        return 1
    return 0
