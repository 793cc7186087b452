"""``wattsweep logs SWEEP_DIR CELL [--rank N] [--lines N]``."""
from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from pathlib import Path

from orchestrator.contracts import SweepPaths
from orchestrator.status.common import resolve_cell
from orchestrator.status.state import StatusError, require_sweep
from orchestrator.submit.shell import quoted

DESCRIPTION = """Print the end of a cell's job logs (stderr, then stdout) for one rank: the
worker's warnings, progress and, for a failed cell, its traceback. The logs are
the ones of the cell's latest job, found from the cell's own folder
(cells/<id>/launch/), whichever launcher ran it."""
EPILOG = """examples:
  wattsweep logs SWEEP_DIR 3f2a9c01b7de              last 30 lines of rank 0's logs
  wattsweep logs SWEEP_DIR 3f2a --rank 3 --lines 0   all of rank 3's logs (an id prefix is enough)

exit status: 0 logs printed, 1 the cell's latest job has no logs yet (not started),
2 no such sweep, cell or rank."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("cell", metavar="CELL", help="a cell id from `wattsweep status`, or a prefix that names one cell")
    p.add_argument("--rank", type=_non_negative, default=None,
                   help="which rank's logs (default: the rank FAILED.json names for a failed cell, else 0)")
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
        rank = _rank(paths, cell_id, args.rank)
    except (StatusError, ValueError) as e:
        print(f"wattsweep logs: {e}", file=sys.stderr)
        return 2
    logs, earlier = cell_logs(paths, cell_id, rank)
    if not logs:
        hint = (f"; an earlier job's are there: {earlier[1]}" if earlier else
                f" (`wattsweep status {quoted(paths.root)}` says whether it has started)")
        print(f"wattsweep logs: the latest job of cell {cell_id} has no logs for rank {rank} yet{hint}", file=sys.stderr)
        return 1
    for path in logs:
        print(f"==> {path} <==")
        sys.stdout.writelines(_tail(path, args.lines))
        print()
    return 0


def _rank(paths: SweepPaths, cell_id: str, given: int | None) -> int:
    """The rank asked for, checked against the cell's size; by default the one
    whose failure FAILED.json records (other ranks' logs then show only the
    collective that broke when it died), else 0."""
    from orchestrator.contracts import read_json
    from orchestrator.plan.planned import read_plan

    shards = next((c.params.shards for c in read_plan(paths) if c.cell_id == cell_id), None)
    if given is None:
        try:
            failed = read_json(paths.failed_marker(cell_id))
            failed_rank = failed.get("rank")
        except (OSError, ValueError, AttributeError):
            failed, failed_rank = {}, None
        given = failed_rank if isinstance(failed_rank, int) and not isinstance(failed_rank, bool) else 0
        killed = (ranks_killed(paths, cell_id, shards or 0, failed_rank)
                  if saw_another_rank_go(str(failed.get("error", ""))) else [])
        if killed:  # FAILED.json's rank only saw the collective break; show the rank that died
            given = killed[0]
            print(f"wattsweep logs: rank {given}'s log stops without an error or an end: it was killed "
                  f"(SIGKILL: out of memory, or the node); FAILED.json is rank {failed_rank}'s, "
                  f"which saw it go", file=sys.stderr)
    if shards is not None and not 0 <= given < shards:
        raise ValueError(f"cell {cell_id} has {shards} rank(s): --rank 0..{shards - 1}")
    return given


def cell_logs(paths: SweepPaths, cell_id: str, rank: int) -> tuple[list[Path], tuple[str, Path] | None]:
    """stderr then stdout of ``rank`` in the cell's latest job: submitit names
    them <job>_<rank>_log.err/.out in the cell's launch folder (links into the
    sweep's launch folder for Slurm arrays). Latest: the job the latest
    submission (or, for a local cell, its runner) names when its files are
    there, else the newest. Also (job, stdout path) of the newest other job
    with logs, for a hint when the latest has none yet."""
    ldir = paths.launch_dir(cell_id)
    try:
        names = os.listdir(ldir)
    except OSError:
        return [], None
    suffix = f"_{rank}_log.out"
    # Existing files only: a Slurm cell's links are made at submission, before its job writes them.
    jobs = [n[: -len(suffix)] for n in names if n.endswith(suffix) and (ldir / n).exists()]
    newest_first = sorted(jobs, key=lambda j: _mtime(ldir / f"{j}{suffix}"), reverse=True)
    latest = _latest_job_id(paths, cell_id)
    if latest is not None and latest not in jobs:
        earlier = next(((j, ldir / f"{j}{suffix}") for j in newest_first), None)
        return [], earlier
    job = latest if latest is not None else (newest_first[0] if newest_first else None)
    if job is None:
        return [], None
    pair = [ldir / f"{job}_{rank}_log.err", ldir / f"{job}_{rank}_log.out"]
    return [p for p in pair if p.exists()], None


def _latest_job_id(paths: SweepPaths, cell_id: str) -> str | None:
    """The id submitit gave the cell's latest job: the Slurm job of the latest
    submission; for a local cell, the job its runner started (None before it
    started, or when no record says)."""
    from orchestrator.submit.base import latest_submission_by_cell

    try:
        sub = latest_submission_by_cell(paths).get(cell_id)
    except (OSError, ValueError):
        return None
    if sub is None:
        return None
    if sub[0].launcher != "local":
        return sub[1]
    from orchestrator.submit.local import local_queue_states

    entry = local_queue_states(paths).get(cell_id) or {}
    return str(entry["job_id"]) if entry.get("job_id") else None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


# What the worker adds to FAILED.json when its rank saw a collective break
# (workers/entry.py); the rank that ended first is then usually the cause.
PEER_GONE_HINT = "another rank probably ended first"
# ... or how it reads when it was stopped because another task of the step died
# (a site's KillOnBadExit, the local runner's gang stop).
STOPPED_BY_TERM = "SignalExit: stopped by SIGTERM"


def saw_another_rank_go(error: str) -> bool:
    """FAILED.json's rank did not fail by itself: it saw another rank go, or was
    stopped because one did."""
    return PEER_GONE_HINT in error or error.startswith(STOPPED_BY_TERM)
# Lines a task's logs hold once it ended by itself: submitit's success line, its
# line for an exception, or a Python traceback. A log with none of them stops
# where its process was killed.
_ENDED = ("Job completed successfully", "Submitted job triggered an exception", "Traceback (most recent call last)")


def ranks_killed(paths: SweepPaths, cell_id: str, shards: int, marker_rank: object = None) -> list[int]:
    """Ranks of the cell's latest job whose logs exist but never say how the
    task ended: killed outright (SIGKILL, the out-of-memory killer, a node lost).
    ``marker_rank`` wrote FAILED.json, so it was not."""
    killed = []
    for rank in range(shards):
        if rank == marker_rank:
            continue
        logs, _ = cell_logs(paths, cell_id, rank)
        if logs and not any(_mentions(p, _ENDED) for p in logs):
            killed.append(rank)
    return killed


def _mentions(path: Path, needles: tuple[str, ...]) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(any(n in line for n in needles) for line in f)
    except OSError:
        return True  # unreadable: make no claim about it


def _tail(path: Path, n: int) -> list[str]:
    """The last n lines (all when n == 0); a log being written is read as it is."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return list(f) if n == 0 else list(deque(f, maxlen=n))
    except OSError as e:
        return [f"(cannot be read: {e.strerror})\n"]
