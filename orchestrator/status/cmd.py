"""``wattsweep status SWEEP_DIR [--json] [--watch] [--state STATE,...]``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from orchestrator.contracts import SweepPaths
from orchestrator.status.state import STATES, CellStatus, StatusError, SweepStatus, dumps, sweep_status
from orchestrator.submit.shell import SlurmCommandError, quoted

DESCRIPTION = """Show each cell's state: the plan and markers of the sweep folder joined with
squeue and, where the cluster keeps accounting, sacct.

states: planned pending running done failed cancelled timeout infeasible missing invalid unknown
(invalid: DONE.json present but an output file fails validation; unknown: Slurm could not
be asked, so a cell without a marker cannot be judged).

job: the Slurm job (ARRAY_TASK for an array task); for a local cell that has started,
the id its log files carry, then in brackets the id it was queued under."""
EPILOG = """examples:
  wattsweep status runs/2026-11-26_12-00-00
  wattsweep status SWEEP_DIR --json | jq '.counts'
  wattsweep status SWEEP_DIR --watch          live counts until every cell has ended
  wattsweep status SWEEP_DIR --state failed,invalid   only those rows (the counts stay whole)
  wattsweep logs SWEEP_DIR CELL               why a failed cell failed, from its job logs"""

BAR_WIDTH = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("--json", action="store_true", help="print the full status as JSON")
    p.add_argument("--watch", action="store_true", help="refresh counts and a progress bar until every cell has ended")
    p.add_argument("--interval", type=_seconds, default=2.0, metavar="S", help="seconds between --watch refreshes (default 2)")
    p.add_argument("--state", type=_states, metavar="STATE[,STATE]",
                   help="show only cells in these states (the counts line still counts every cell)")
    p.add_argument("--no-validate", action="store_true", help="trust DONE.json without checking the output files")
    p.add_argument("--deep", action="store_true",
                   help="validate done cells as reduce does (footers, schemas, row ownership), not only their checksums; "
                        "resubmit always does")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _states(text: str) -> frozenset[str]:
    wanted = frozenset(s.strip().lower() for s in text.split(",") if s.strip())  # FAILED as Slurm spells it
    unknown = sorted(wanted - set(STATES))
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown state {unknown[0] if unknown else text!r}; valid: {', '.join(STATES)}")
    return wanted


def run(args: argparse.Namespace) -> int:
    paths = SweepPaths.of(args.sweep_dir)
    if args.watch and getattr(args, "state", None):
        print("wattsweep status: --state picks rows of the table; --watch shows counts only: use one of them",
              file=sys.stderr)
        return 2
    try:
        if args.watch:
            return _watch(paths, args.interval, not args.no_validate)
        st = sweep_status(paths, validate=not args.no_validate, deep=args.deep)
    except (StatusError, SlurmCommandError) as e:
        print(f"wattsweep status: {e}", file=sys.stderr)
        return 2
    if st.queue_error:
        print(f"wattsweep status: warning: Slurm could not be asked ({st.queue_error}); states come from the sweep folder only", file=sys.stderr)
    if getattr(args, "state", None):
        st = dataclasses.replace(st, cells=tuple(c for c in st.cells if c.state in args.state))  # counts stay whole
    if args.json:
        print(dumps(st, state_filter=sorted(args.state)) if getattr(args, "state", None) else dumps(st))
    elif getattr(args, "state", None) and not st.cells:
        print(f"no cell is {' or '.join(sorted(args.state))}")
        print(format_counts(st))
    else:
        print(format_table(st))
    return 0


def format_table(st: SweepStatus) -> str:
    head = ("cell", "parameters", "state", "job", "elapsed", "nodes", "reason")
    rows = [(c.cell_id, c.params, c.state, _job(c), _hms(c.elapsed_s), c.nodes or "-", c.reason or "")
            for c in st.cells]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(format_counts(st))
    if st.accounting is False:
        lines.append("(no Slurm accounting on this cluster: ended jobs are judged by their markers)")
    return "\n".join(lines)


def format_counts(st: SweepStatus) -> str:
    parts = [f"{n} {s}" for s, n in st.counts.items() if n]
    return f"{sum(st.counts.values())} cells: " + (", ".join(parts) if parts else "none")


def bar(ended: int, total: int) -> str:
    """``[####......]``: the share of cells that have ended."""
    filled = round(BAR_WIDTH * ended / max(1, total))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"


def progress_line(st: SweepStatus) -> str:
    ended = sum(n for s, n in st.counts.items() if s not in ("planned", "pending", "running"))
    return f"{bar(ended, len(st.cells))} {ended}/{len(st.cells)} ended | " + \
        " ".join(f"{s}={st.counts[s]}" for s in STATES if st.counts.get(s))


def _watch(paths: SweepPaths, interval_s: float, validate: bool) -> int:
    tty = sys.stdout.isatty()
    while True:
        st = sweep_status(paths, validate=validate, deep=False)  # refreshed often: checksums only
        stop = _stop_watching(st, paths)
        if not st.queue_error:  # without the queue the counts mean nothing
            line = progress_line(st)
            print(("\r\033[K" + line) if tty else line, end="" if tty else "\n", flush=True)
        if st.all_ended or stop is not None:
            if tty:
                print()
            if stop is not None:
                print(f"wattsweep status: {stop[1]}", file=sys.stderr)
                return stop[0]
            return 0
        time.sleep(interval_s)


def _stop_watching(st: SweepStatus, paths: SweepPaths) -> tuple[int, str] | None:
    """(exit status, why) when waiting cannot change what status shows."""
    if st.queue_error:
        return 2, f"Slurm could not be asked ({st.queue_error}); stopped watching: the cells' states cannot be known"
    if not st.all_ended and not any(st.counts.get(s) for s in ("pending", "running")):
        return 1, (f"{st.counts.get('planned', 0)} cell(s) were never submitted; nothing to wait for "
                   f"(`wattsweep resubmit {quoted(paths.root)}` launches them)")
    return None


def _job(c: CellStatus) -> str:
    """The job column: a local cell's controller id once started (what its log
    files are named after), with the runner's id it was queued under."""
    if c.log_job and c.log_job != c.job_id:
        return f"{c.log_job} ({c.job_id})"
    return c.job_id or "-"


def _hms(s: int | None) -> str:
    if s is None:
        return "-"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
