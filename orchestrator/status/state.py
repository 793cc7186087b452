"""A cell's state, derived from its folder and the queue, never stored.

Order of evidence, first match wins:
1. not feasible in the plan                               -> infeasible
2. the latest Slurm job ended CANCELLED or TIMEOUT        -> cancelled / timeout
   (a worker killed by scancel may still have written FAILED.json)
3. DONE.json: outputs valid -> done, else                 -> invalid
4. the Slurm job is in the queue (squeue)                 -> pending / running
5. `wattsweep cancel` stopped the latest job, which has   -> cancelled
   left the queue (cancellations.jsonl; sacct may lag)
6. FAILED.json                                             -> failed
   the local runner has it                                -> pending / running
7. accounting says the job failed                         -> failed
8. never submitted                                        -> planned
9. submitted, no marker, not in the queue                 -> missing
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from orchestrator.contracts import SweepPaths, read_json
from orchestrator.plan.planned import PlanFileError, PlannedCell, read_plan
from orchestrator.status.slurm_queue import JobFacts, sacct_jobs, squeue_jobs
from orchestrator.submit.shell import SlurmCommandError, quoted
from orchestrator.submit.base import SubmissionRecord, read_submissions
from orchestrator.submit.cancellations import Cancellation, cancelled_latest

STATES = ("planned", "pending", "running", "done", "failed", "cancelled", "timeout", "infeasible", "missing", "invalid",
          "unknown")  # unknown: Slurm could not be asked; never resubmitted
ENDED = frozenset({"done", "failed", "cancelled", "timeout", "infeasible", "missing", "invalid"})
# The reason of a cell whose latest job `wattsweep cancel` stopped and that has not ended yet.
BEING_CANCELLED = "being cancelled (wattsweep cancel)"
RESUBMITTABLE = frozenset({"failed", "cancelled", "timeout", "missing", "invalid", "planned"})

_RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING"}
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_SACCT_FAILED = {"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class StatusError(RuntimeError):
    """The sweep folder cannot be read; the message names the file."""


@dataclass(frozen=True)
class CellStatus:
    cell_id: str
    state: str  # one of STATES
    launcher: str | None = None
    job_id: str | None = None  # "<array>_<index>" for Slurm array tasks
    # The id the job's log files carry when it differs from job_id: a local cell's
    # submitit controller, once its runner started it (its logs: <log_job>_<rank>_log.out)
    log_job: str | None = None
    array_index: int | None = None
    elapsed_s: int | None = None
    nodes: str | None = None
    reason: str | None = None
    params: str = ""  # the cell's parameters in a few words: model, shards, batch, cap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepStatus:
    sweep_dir: str
    cells: tuple[CellStatus, ...]
    accounting: bool | None  # None: no Slurm job to ask about
    counts: dict[str, int] = field(default_factory=dict)
    queue_error: str | None = None  # why squeue/sacct could not be asked, if so

    @property
    def all_ended(self) -> bool:
        return all(c.state in ENDED for c in self.cells)

    def to_dict(self) -> dict[str, Any]:
        return {"sweep_dir": self.sweep_dir, "accounting": self.accounting, "counts": self.counts,
                "cells": [c.to_dict() for c in self.cells]}


Validator = Callable[[SweepPaths, list[str]], dict[str, tuple[bool, str | None]]]


def sweep_status(paths: SweepPaths, *, validate: bool = True, query_queue: bool = True, deep: bool = True) -> SweepStatus:
    """Every cell's state. ``validate`` checks done cells' outputs: ``deep`` with the
    reduce step's validator (checksums, Parquet footers, schemas, row ownership),
    else checksums against DONE.json only (what a truncated or overwritten file
    breaks; about 2x faster on a cold sweep)."""
    plan = _read_plan(paths)
    latest = _latest_submissions(paths)
    slurm_ids = sorted({r.extra.get("array_job_id") or jid.split("_")[0]
                        for r, jid in latest.values() if r.launcher == "slurm" and (r.extra is not None)})
    queue_error = None
    try:
        live = squeue_jobs(slurm_ids) if (query_queue and slurm_ids) else {}
        acct = sacct_jobs(slurm_ids) if (query_queue and slurm_ids) else None
    except SlurmCommandError as e:
        # Slurm unreachable (controller down, not a cluster node): report what the
        # folder knows; cells that need the queue to be judged become "unknown".
        live, acct, queue_error = {}, None, str(e).splitlines()[0]
    local = _local_states(paths) if any(r.launcher == "local" for r, _ in latest.values()) else {}
    done_ids = [c.cell_id for c in plan if paths.done_marker(c.cell_id).is_file()]
    verdicts = _validate(paths, done_ids, deep) if validate else {cid: (True, None) for cid in done_ids}
    cancels = cancelled_latest(paths, latest)
    cells = tuple(
        _cell_state(paths, c, latest.get(c.cell_id), live, acct or {}, local, verdicts, queue_error, cancels)
        for c in plan
    )
    counts = Counter(c.state for c in cells)
    # accounting: None when unknown (no Slurm cells, or Slurm could not be asked at all).
    return SweepStatus(str(paths.root), cells, None if not slurm_ids or queue_error else acct is not None,
                       {s: counts.get(s, 0) for s in STATES}, queue_error)


def _cell_state(
    paths: SweepPaths,
    cell: PlannedCell,
    sub: tuple[SubmissionRecord, str] | None,
    live: dict[str, JobFacts],
    acct: dict[str, JobFacts],
    local: dict[str, dict[str, Any]],
    verdicts: dict[str, tuple[bool, str | None]],
    queue_error: str | None = None,
    cancels: dict[str, Cancellation] | None = None,
) -> CellStatus:
    cid = cell.cell_id
    label = params_label(cell)
    if not cell.feasible:
        return CellStatus(cid, "infeasible", reason=cell.reason, params=label)
    rec, job_id = sub if sub else (None, None)
    base = CellStatus(cid, "planned", launcher=rec.launcher if rec else None, job_id=job_id,
                      array_index=_array_index(job_id) if rec and rec.launcher == "slurm" else None,
                      params=label)
    facts = (live.get(job_id) or acct.get(job_id)) if (rec and rec.launcher == "slurm" and job_id) else None
    if facts is not None:
        base = _with_facts(base, facts)
    elif rec is not None and rec.launcher == "local" and cid in local:
        controller = local[cid].get("job_id")
        base = _replace(base, elapsed_s=_local_elapsed_s(local[cid], _marker_mtime(paths, cid)),
                        log_job=str(controller) if controller is not None else None)
    ended_as = acct.get(job_id) if job_id and job_id not in live else None
    cancel = (cancels or {}).get(cid)  # of the latest job only
    by_cancel = cancel.describe() if cancel is not None else None
    if ended_as is not None and ended_as.state in ("CANCELLED", "TIMEOUT"):
        if ended_as.state == "CANCELLED":
            return _replace(base, state="cancelled", reason=by_cancel or base.reason)
        return _replace(base, state="timeout")
    if cid in verdicts:
        ok, why = verdicts[cid]
        return _replace(base, state="done" if ok else "invalid", reason=None if ok else why,
                        nodes=base.nodes or _done_hosts(paths, cid))
    if rec is not None and rec.launcher == "slurm" and job_id in live:
        # A live job outranks FAILED.json: a requeued attempt (timeout, preemption)
        # leaves the marker of the interrupted one until it moves it aside.
        st = live[job_id].state
        return _replace(base, state="running" if st in _RUNNING else "pending",
                        reason=BEING_CANCELLED if by_cancel else base.reason)
    if by_cancel and _still_queued_locally(rec, local.get(cid)):
        # The runner has not yet reaped the cell: its worker may already have
        # written FAILED.json on the SIGTERM, but the cell has not ended.
        return _replace(base, state=local[cid]["state"], reason=BEING_CANCELLED)
    if by_cancel and not (queue_error and rec is not None and rec.launcher == "slurm"):
        return _replace(base, state="cancelled", reason=by_cancel)
    if paths.failed_marker(cid).is_file():
        reason = failed_reason(paths, cid, cell.params.shards)
        if hit_time_limit(reason):
            key = "timeout_min" if rec is not None and rec.launcher == "local" else "time_min"
            return _replace(base, state="timeout", reason=f"{reason} (more time: `wattsweep resubmit "
                                                           f"{quoted(paths.root)} --launcher {key}=N`)")
        return _replace(base, state="failed", reason=reason)
    if rec is None:
        return base
    if rec.launcher == "local" and cid in local:
        st = local[cid].get("state")
        if st in ("pending", "running"):
            orphan = (f"its runner died; the cell's processes still run (controller pid {local[cid].get('job_id')}): "
                      f"`wattsweep cancel {quoted(paths.root)} --cells {cid}` stops them") if local[cid].get("orphan") else None
            waiting = local[cid].get("waiting_for") if st == "pending" else None
            return _replace(base, state=st, reason=orphan or waiting)
        if st == "lost":
            return _replace(base, state="missing", reason=f"its local runner ended before the cell did (killed?); "
                                                          f"`wattsweep resubmit {quoted(paths.root)}` runs it again")
    if queue_error and rec.launcher == "slurm":
        return _replace(base, state="unknown", reason=f"no marker, and Slurm could not be asked: {queue_error}")
    if ended_as is not None and ended_as.state in _SACCT_FAILED:
        return _replace(base, state="failed", reason=f"Slurm: {ended_as.state}" + (f" ({ended_as.reason})" if ended_as.reason else ""))
    if ended_as is not None and ended_as.state in _PENDING | _RUNNING:
        # sacct has it queued but squeue missed it (a requeue in between): not lost yet
        return _replace(base, state="pending" if ended_as.state in _PENDING else "running")
    return _replace(base, state="missing", reason=base.reason or "no DONE.json or FAILED.json and not in the queue")


def _still_queued_locally(rec: SubmissionRecord | None, entry: dict[str, Any] | None) -> bool:
    """The local runner has not yet acted on a cancel of this cell."""
    return bool(rec is not None and rec.launcher == "local" and entry and entry.get("state") in ("pending", "running"))


def _local_elapsed_s(entry: dict[str, Any], marker_mtime: float | None = None) -> int | None:
    """Run time of a local cell from its runner's queue entry: to its end, else to its
    DONE/FAILED marker (a runner killed before it reaped the cell never writes the end),
    else to now while it runs."""
    start = entry.get("started_unix_s")
    if not isinstance(start, (int, float)):
        return None
    end = entry.get("ended_unix_s")
    if not isinstance(end, (int, float)):
        end = marker_mtime if marker_mtime is not None else time.time()
    return max(0, int(end - start))


def _marker_mtime(paths: SweepPaths, cid: str) -> float | None:
    """When the cell's DONE.json or FAILED.json was written, if it was."""
    for marker in (paths.done_marker(cid), paths.failed_marker(cid)):
        try:
            return marker.stat().st_mtime
        except OSError:
            continue
    return None


def hit_time_limit(reason: str) -> bool:
    """submitit catches Slurm's warning before the time limit and requeues; once
    out of requeues it fails the job with this message, so sacct records FAILED,
    not TIMEOUT: the marker is where the timeout shows."""
    return "not requeued" in reason and "timed-out" in reason


def params_label(cell: PlannedCell) -> str:
    p = cell.params
    cap = "uncapped" if p.power_cap_w is None else f"{p.power_cap_w:g}W"
    kv = "" if p.kv_cache_dtype == "auto" else f" kv={p.kv_cache_dtype}"  # else two cells could read the same
    return f"{p.model} x{p.shards} b{p.batch_size} {cap} {p.dataset}{kv}"


def _replace(s: CellStatus, **kw: Any) -> CellStatus:
    d = asdict(s)
    d.update(kw)
    return CellStatus(**d)


def _with_facts(s: CellStatus, f: JobFacts) -> CellStatus:
    return _replace(s, elapsed_s=f.elapsed_s, nodes=f.nodes, reason=f.reason)


def _array_index(job_id: str | None) -> int | None:
    if job_id and "_" in job_id and job_id.rsplit("_", 1)[1].isdigit():
        return int(job_id.rsplit("_", 1)[1])
    return None


def require_sweep(paths: SweepPaths) -> None:
    """Refuse a folder that is not a sweep before anything is written in it
    (resubmit's and cancel's lock file would make one out of a typo)."""
    if not paths.root.is_dir():
        raise StatusError(f"{paths.root}: no such folder; give a sweep folder made by `wattsweep sweep`")
    if not paths.plan_jsonl.is_file():
        raise StatusError(f"{paths.plan_jsonl}: no plan file; is {paths.root} a sweep folder made by `wattsweep sweep`?")


def _read_plan(paths: SweepPaths) -> list[PlannedCell]:
    if not paths.root.is_dir():
        raise StatusError(f"{paths.root}: no such folder; give a sweep folder made by `wattsweep sweep`")
    try:
        return read_plan(paths)
    except PlanFileError as e:
        raise StatusError(str(e)) from None
    except OSError as e:
        raise StatusError(f"{paths.plan_jsonl}: cannot be read ({e.strerror})") from None


def _latest_submissions(paths: SweepPaths) -> dict[str, tuple[SubmissionRecord, str]]:
    try:
        records = read_submissions(paths)
    except (ValueError, OSError) as e:
        raise StatusError(str(e)) from None
    out: dict[str, tuple[SubmissionRecord, str]] = {}
    for rec in records:
        if len(rec.cell_ids) != len(rec.job_ids):
            raise StatusError(f"{paths.submissions_jsonl}: a line has {len(rec.cell_ids)} cell ids "
                              f"but {len(rec.job_ids)} job ids")
        for cid, jid in zip(rec.cell_ids, rec.job_ids):
            out[cid] = (rec, jid)
    return out


def _local_states(paths: SweepPaths) -> dict[str, dict[str, Any]]:
    try:
        from orchestrator.submit.local import local_queue_states
    except ImportError:
        return {}
    return local_queue_states(paths)


def failed_reason(paths: SweepPaths, cid: str, shards: int | None = None) -> str:
    """FAILED.json's error line (what status shows for a failed cell). When the
    rank that wrote it only saw another rank go, and ``shards`` is given, the
    ranks whose logs stop without an end (killed) are named first."""
    try:
        failed = read_json(paths.failed_marker(cid))
        error = str(failed.get("error") or "FAILED.json without an error")
    except (OSError, ValueError, AttributeError) as e:
        return f"FAILED.json unreadable ({e})"
    from orchestrator.status.logs_cmd import ranks_killed, saw_another_rank_go

    if shards and saw_another_rank_go(error) and (killed := ranks_killed(paths, cid, shards, failed.get("rank"))):
        who = f"rank {killed[0]} was" if len(killed) == 1 else f"ranks {', '.join(map(str, killed))} were"
        return (f"{who} killed (log stops without an error: out of memory, or the node?); "
                f"`wattsweep logs {quoted(paths.root)} {cid}` shows it. Rank {failed.get('rank', '?')} saw: {error}")
    return error


def _done_hosts(paths: SweepPaths, cid: str) -> str | None:
    try:
        hosts = read_json(paths.done_marker(cid)).get("hosts") or []
    except (OSError, ValueError):
        return None
    return ",".join(sorted(set(map(str, hosts)))) or None


# ---------------------------------------------------------------------------
# Output validation
# ---------------------------------------------------------------------------


def _validate(paths: SweepPaths, cell_ids: list[str], deep: bool = True) -> dict[str, tuple[bool, str | None]]:
    """The reduce step's validator (it caches verdicts) when deep, else checksums."""
    if not cell_ids:
        return {}
    if not deep:
        return {cid: checksum_verdict(paths, cid) for cid in cell_ids}
    try:
        from orchestrator.reduce.validate import validate_cells
    except ImportError:
        return {cid: checksum_verdict(paths, cid) for cid in cell_ids}
    return {cid: (v.ok, v.reason) for cid, v in validate_cells(paths, cell_ids).items()}


def checksum_verdict(paths: SweepPaths, cell_id: str) -> tuple[bool, str | None]:
    """Every file DONE.json lists exists and has the sha256 it records."""
    from orchestrator.contracts import sha256_file

    cdir = paths.cell_dir(cell_id)
    try:
        files = read_json(paths.done_marker(cell_id))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"DONE.json malformed ({e})"
    for rel, meta in sorted(files.items()):
        f = cdir / rel
        if not f.is_file():
            return False, f"{rel} listed in DONE.json is missing"
        if sha256_file(f) != meta.get("sha256"):
            return False, f"{rel}: sha256 does not match DONE.json"
    return True, None


def select(status: SweepStatus, states: Iterable[str]) -> list[CellStatus]:
    wanted = set(states)
    return [c for c in status.cells if c.state in wanted]


def dumps(status: SweepStatus, **extra: Any) -> str:
    """The status as JSON; ``extra``: top-level keys to add (e.g. the filter that chose the cells)."""
    return json.dumps({**status.to_dict(), **extra}, indent=2, sort_keys=True)
