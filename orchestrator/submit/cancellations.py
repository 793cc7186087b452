"""``SWEEP_DIR/cancellations.jsonl``: which jobs `wattsweep cancel` stopped, when, by whom.

One JSON line per cancel: ``{"unix_s", "by": {"user", "host"}, "jobs": {cell_id: job_id}}``.
Two readers use it:
- ``status`` shows a cell whose latest job is listed as ``cancelled`` as soon as the
  job has left the queue. Without it, a cancelled job shows as ``missing`` until
  Slurm's accounting catches up (seconds to minutes), or for good on a cluster
  without accounting.
- the local runner (``submit/local.py``) stops listed cells: a pending one is
  never started; a running one gets SIGTERM, so its workers restore their caps.

A line names job ids, not only cells: a cell resubmitted later runs as a new
job that the old cancel does not touch.
"""
from __future__ import annotations

import getpass
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from orchestrator.contracts import SweepPaths


@dataclass(frozen=True)
class Cancellation:
    job_id: str
    unix_s: float
    user: str
    host: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.unix_s))
        return f"cancelled by {self.user} on {self.host} at {when} (wattsweep cancel)"


def cancellations_path(paths: SweepPaths) -> Path:
    return paths.root / "cancellations.jsonl"


def append_cancellation(paths: SweepPaths, jobs: Mapping[str, str]) -> None:
    """Record that these cells' jobs (cell id -> job id) are being cancelled:
    Slurm jobs once scancel has taken them; local cells before anything else,
    since their runner acts on this record. Fsynced like submissions.jsonl."""
    if not jobs:
        return
    from orchestrator.submit.base import append_lines

    append_lines(cancellations_path(paths), json.dumps(
        {"unix_s": time.time(), "by": {"user": _user(), "host": socket.gethostname()}, "jobs": dict(jobs)},
        sort_keys=True) + "\n")


def read_cancellations(paths: SweepPaths) -> dict[str, Cancellation]:
    """cell id -> its latest cancellation. A line that is not a record (cut
    short by a crash, edited by hand) is skipped with a warning: a cancel
    record only changes how an ended job is labelled, never what is resubmitted."""
    path = cancellations_path(paths)
    out: dict[str, Cancellation] = {}
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    with f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                print(f"wattsweep: warning: {path}:{lineno}: skipped a line that is not a cancel record",
                      file=sys.stderr)
                continue
            unix_s, user, host, jobs = record
            for cid, jid in jobs.items():
                out[cid] = Cancellation(jid, unix_s, user, host)
    return out


def _parse(line: str) -> tuple[float, str, str, dict[str, str]] | None:
    try:
        d: Any = json.loads(line)
        by = d.get("by") or {}
        jobs = d["jobs"]
        if not isinstance(jobs, dict) or not isinstance(by, dict):
            return None
        unix_s = d["unix_s"]
        if isinstance(unix_s, bool) or not isinstance(unix_s, (int, float)) or not 0 <= unix_s < 1e11:
            return None  # not a time this century's clocks give (NaN fails the comparison too)
        return (float(unix_s), str(by.get("user", "?")), str(by.get("host", "?")),
                {str(c): str(j) for c, j in jobs.items()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def cancelled_latest(paths: SweepPaths, latest: Mapping[str, tuple[Any, str]] | None = None) -> dict[str, Cancellation]:
    """Cells whose latest job (``latest``: cell id -> (submission, job id), read
    from submissions.jsonl when not given) `wattsweep cancel` recorded stopping.
    A cancel of an earlier job of a cell that was resubmitted since does not count."""
    cancels = read_cancellations(paths)
    if not cancels:
        return {}
    if latest is None:
        from orchestrator.submit.base import latest_submission_by_cell

        try:
            latest = latest_submission_by_cell(paths)
        except (OSError, ValueError):
            return {}
    return {cid: c for cid, c in cancels.items() if cid in latest and latest[cid][1] == c.job_id}
