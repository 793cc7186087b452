"""``wattsweep logs SWEEP_DIR CELL [--rank N] [--lines N]``."""
from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from pathlib import Path

from orchestrator.contracts import SweepPaths
from orchestrator.status.state import StatusError, require_sweep

DESCRIPTION = """Print the end of a cell's job logs (stderr, then stdout) for one rank: the
worker's warnings, progress and, for a failed cell, its traceback. The logs are
the ones of the cell's latest job, found from the cell's own folder
(cells/<id>/launch/), whichever launcher ran it."""
EPILOG = """examples:
  wattsweep logs SWEEP_DIR 3f2a9c01b7de              last 30 lines of rank 0's logs
  wattsweep logs SWEEP_DIR 3f2a --rank 3 --lines 0   all of rank 3's logs (an id prefix is enough)

exit status: 0 logs printed, 1 the cell has no logs yet (never started), 2 no such sweep or cell."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("cell", metavar="CELL", help="a cell id from `wattsweep status`, or a prefix that names one cell")
    p.add_argument("--rank", type=_non_negative, default=0, help="which rank's logs (default 0)")
    p.add_argument("--lines", type=_non_negative, default=30, metavar="N",
                   help="last N lines of each log (default 30; 0: the whole log)")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return value


def run(args: argparse.Namespace) -> int:
    paths = SweepPaths.of(args.sweep_dir)
    try:
        require_sweep(paths)
        cell_id = resolve_cell(paths, args.cell)
    except (StatusError, ValueError) as e:
        print(f"wattsweep logs: {e}", file=sys.stderr)
        return 2
    logs = cell_logs(paths, cell_id, args.rank)
    if not logs:
        print(f"wattsweep logs: cell {cell_id} has no logs for rank {args.rank} yet "
              f"(`wattsweep status {paths.root}` says whether it has started)", file=sys.stderr)
        return 1
    for path in logs:
        print(f"==> {path} <==")
        sys.stdout.writelines(_tail(path, args.lines))
        print()
    return 0


def resolve_cell(paths: SweepPaths, given: str) -> str:
    """The planned cell id ``given`` names, in full or by a unique prefix."""
    from orchestrator.plan.planned import PlanFileError, read_plan

    try:
        ids = [c.cell_id for c in read_plan(paths)]
    except PlanFileError as e:
        raise StatusError(str(e)) from None
    if given in ids:
        return given
    matches = [c for c in ids if c.startswith(given)] if given else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"cell prefix {given!r} names {len(matches)} cells ({', '.join(matches[:4])}...); give more of the id")
    raise ValueError(f"no cell {given!r} in {paths.root}; valid: ids listed by `wattsweep status {paths.root}`")


def cell_logs(paths: SweepPaths, cell_id: str, rank: int) -> list[Path]:
    """stderr then stdout of ``rank`` in the cell's latest job: submitit names
    them <job>_<rank>_log.err/.out in the cell's launch folder (links into the
    sweep's launch folder for Slurm arrays). Latest: of the latest submission
    when its files are there, else the newest pair."""
    ldir = paths.launch_dir(cell_id)
    try:
        names = os.listdir(ldir)
    except OSError:
        return []
    suffix = f"_{rank}_log.out"
    jobs = [n[: -len(suffix)] for n in names if n.endswith(suffix)]
    if not jobs:
        return []
    latest = _latest_job_id(paths, cell_id)
    job = latest if latest in jobs else max(jobs, key=lambda j: _mtime(ldir / f"{j}{suffix}"))
    pair = [ldir / f"{job}_{rank}_log.err", ldir / f"{job}_{rank}_log.out"]
    return [p for p in pair if p.exists()]


def _latest_job_id(paths: SweepPaths, cell_id: str) -> str | None:
    from orchestrator.submit.base import latest_submission_by_cell

    try:
        sub = latest_submission_by_cell(paths).get(cell_id)
    except (OSError, ValueError):
        return None
    return sub[1] if sub else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _tail(path: Path, n: int) -> list[str]:
    """The last n lines (all when n == 0); a log being written is read as it is."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return list(f) if n == 0 else list(deque(f, maxlen=n))
    except OSError as e:
        return [f"(cannot be read: {e.strerror})\n"]
