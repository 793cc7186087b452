"""What Slurm says about a sweep's jobs: ``squeue`` (live) and ``sacct`` (ended).

Both are read with one call each for the whole sweep, whatever its size, and
return one ``JobFacts`` per array task id (``<array>_<index>``) or plain job id.
``sacct`` is optional: on a cluster without accounting it fails and the sweep's
state is built from ``squeue`` and the markers alone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.submit.shell import SlurmCommandError, have, run_cmd

_SEP = "|"
_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")


@dataclass(frozen=True)
class JobFacts:
    job_id: str  # "123_4" for an array task, "123" for a plain job
    state: str  # Slurm's state word: PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT, ...
    elapsed_s: int | None
    nodes: str | None
    reason: str | None
    source: str  # "squeue" | "sacct"


def expand_job_ids(job_id: str) -> list[str]:
    """``12_[0-3,7%2]`` -> ["12_0", "12_1", "12_2", "12_3", "12_7"]; others as given."""
    m = _ARRAY_RANGE.match(job_id.strip())
    if not m:
        return [job_id.strip()]
    head, spec = m.group(1), m.group(2).split("%")[0]
    out: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(f"{head}_{i}" for i in range(int(lo), int(hi or lo) + 1))
    return out


def _elapsed_s(text: str) -> int | None:
    """squeue's ``[D-]HH:MM:SS`` / ``MM:SS`` -> seconds."""
    text = text.strip()
    if not text or text in ("INVALID", "N/A"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def squeue_jobs(array_ids: list[str]) -> dict[str, JobFacts]:
    """Live jobs among these array/job ids (one squeue call, array tasks expanded)."""
    if not array_ids or not have("squeue"):
        return {}
    args = ["squeue", "-r", "-h", "-j", ",".join(sorted(set(array_ids))), "-o", "%i|%T|%M|%N|%r"]
    proc = run_cmd(args, check=False, timeout_s=60)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:  # every id has left the queue
            return {}
        raise SlurmCommandError(args, f"squeue failed: {proc.stderr.strip()}", proc.returncode, proc.stderr)
    out: dict[str, JobFacts] = {}
    for line in proc.stdout.splitlines():
        f = line.split(_SEP)
        if len(f) < 5:
            continue
        for jid in expand_job_ids(f[0]):
            out[jid] = JobFacts(jid, f[1].strip(), _elapsed_s(f[2]), f[3].strip() or None, _reason(f[4]), "squeue")
    return out


def sacct_jobs(array_ids: list[str]) -> dict[str, JobFacts] | None:
    """Accounting records of these jobs (the latest per task); None without accounting."""
    if not array_ids or not have("sacct"):
        return None
    args = ["sacct", "-X", "-n", "-P", "-j", ",".join(sorted(set(array_ids))),
            "-o", "JobID,State,ElapsedRaw,NodeList,Reason"]
    proc = run_cmd(args, check=False, timeout_s=60)
    if proc.returncode != 0:
        return None  # "accounting storage is disabled" and friends
    out: dict[str, JobFacts] = {}
    for line in proc.stdout.splitlines():
        f = line.split(_SEP)
        if len(f) < 5:
            continue
        state = f[1].split()[0] if f[1].strip() else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
        elapsed = int(f[2]) if f[2].strip().isdigit() else None
        nodes = None if f[3].strip() in ("", "None assigned") else f[3].strip()
        for jid in expand_job_ids(f[0]):
            out[jid] = JobFacts(jid, state, elapsed, nodes, _reason(f[4]), "sacct")  # later lines win
    return out


def _reason(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "(null)") else text
