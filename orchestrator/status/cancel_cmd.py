"""``wattsweep cancel SWEEP_DIR [--cells ID ...] [--dry-run]``."""
from __future__ import annotations

import argparse
import re
import sys

from orchestrator.contracts import SweepPaths
from orchestrator.status.common import pick_cells, resolve_cells, run_on_sweep
from orchestrator.status.state import CellStatus, StatusError, sweep_status
from orchestrator.submit.cancellations import Cancellation
from orchestrator.submit.shell import SlurmCommandError, quoted

DESCRIPTION = """Stop a sweep's pending and running cells (or only the ones named): Slurm jobs
through scancel, local cells through the sweep's local runner. Each cancel is
recorded in SWEEP_DIR/cancellations.jsonl (cell, job, who, when), so `status`
shows the cells as cancelled as soon as they leave the queue, even before
Slurm's accounting has caught up.

Workers that receive the cancel's SIGTERM restore the GPUs' power caps before
they exit; `wattsweep audit --ledger SWEEP_DIR` shows whether every cap came back."""
EPILOG = """examples:
  wattsweep cancel SWEEP_DIR                         every pending and running cell
  wattsweep cancel SWEEP_DIR --cells 3f2a9c01b7de    only this one
  wattsweep cancel SWEEP_DIR --dry-run               say what would be cancelled
  wattsweep resubmit SWEEP_DIR                       later: run the cancelled cells again

Cell ids may be given by a prefix that names one cell. A cancelled cell still
running after 30 s (a local worker that does not exit) is killed, as Slurm does.

exit status: 0 cancelled (or nothing to cancel), 1 some cells were not cancelled or
not recorded (the message says which), 2 the sweep folder or the queue could not be
read, another command held the sweep too long, or an unknown cell id."""

ACTIVE = frozenset({"pending", "running"})
# scancel's complaint about one job, e.g. "scancel: error: Kill job error on job id 12_3: Invalid job id specified"
_JOB_ERROR = re.compile(r"job id (\d+(?:_\d+)?)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cells (ids from `wattsweep status`)")
    p.add_argument("--dry-run", action="store_true", help="say what would be cancelled, cancel nothing")


def run(args: argparse.Namespace) -> int:
    paths = SweepPaths.of(args.sweep_dir)
    return run_on_sweep(paths, "cancel", lambda: _run(args, paths), lock=not args.dry_run)


def _run(args: argparse.Namespace, paths: SweepPaths) -> int:
    from orchestrator.submit.cancellations import cancelled_latest

    try:
        st = sweep_status(paths, validate=False)
        if st.queue_error:
            raise SlurmCommandError(["squeue"], f"cannot tell which cells are queued: {st.queue_error}")
        named = resolve_cells(paths, args.cells) if args.cells else None
        todo = choose(st.cells, named, cancelled_latest(paths))
    except (StatusError, SlurmCommandError, ValueError) as e:
        print(f"wattsweep cancel: {e}", file=sys.stderr)
        return 2
    if not todo:
        print("nothing to cancel: " + ("none of the cells named is pending or running" if named
                                       else "no cell is pending or running"))
        return 0
    if args.dry_run:
        for c in todo:
            print(f"would cancel {c.cell_id} ({c.state}, {c.launcher} job {c.job_id}): {c.params}")
        return 0
    return cancel(paths, todo)


def choose(cells: tuple[CellStatus, ...], cell_ids: list[str] | None,
           cancels: dict[str, Cancellation] | None = None) -> list[CellStatus]:
    """The cells to cancel, in plan order: pending or running, and named if any are.
    A cell whose current job a cancel already stopped (``cancels``: of the
    cells' latest jobs) is skipped: cancelling it again would only overwrite
    who cancelled it and when."""
    picked = pick_cells(cells, cell_ids, ACTIVE, lambda c: f"{c.state}, not pending or running")
    out = []
    for c in picked:
        earlier = (cancels or {}).get(c.cell_id)
        if earlier is not None:
            print(f"skipping {c.cell_id}: already {earlier.describe()}, still ending")
        elif c.job_id:
            out.append(c)
    return out


def cancel(paths: SweepPaths, cells: list[CellStatus]) -> int:
    from orchestrator.submit.cancellations import append_cancellation
    from orchestrator.submit.local import local_queue_states, stop_controller

    slurm = {c.cell_id: str(c.job_id) for c in cells if c.launcher == "slurm"}
    local = {c.cell_id: str(c.job_id) for c in cells if c.launcher == "local"}
    refused = scancel(list(slurm.values())) if slurm else {}
    stopped = {cid: jid for cid, jid in slurm.items() if jid not in refused}
    for jid, why in refused.items():
        print(f"wattsweep cancel: job {jid}: {why}", file=sys.stderr)
    # Slurm's cancels are recorded once scancel took them; local ones are
    # requests the runner acts on when it reads this record.
    try:
        append_cancellation(paths, {**stopped, **local})
    except OSError as e:
        if stopped:
            print(f"wattsweep cancel: Slurm jobs {' '.join(stopped.values())} were cancelled, but the record could not "
                  f"be written ({e.strerror}): status shows them cancelled once Slurm's accounting does", file=sys.stderr)
        if local:
            print(f"wattsweep cancel: local cells {' '.join(local)} were NOT cancelled: their runner reads the record, "
                  f"which could not be written ({e.strerror})", file=sys.stderr)
        return 1
    # A local cell whose runner died has no one to read the record: stop it here.
    entries = local_queue_states(paths) if local else {}
    for cid in local:
        entry = entries.get(cid) or {}
        if entry.get("orphan"):
            stop_controller(entry.get("job_id"))
    for c in cells:
        if c.cell_id in stopped or c.cell_id in local:
            print(f"cancelled {c.cell_id} ({c.launcher} job {c.job_id}, was {c.state}): {c.params}")
    n = len(stopped) + len(local)
    print(f"cancelled {n} cell(s); `wattsweep status {quoted(paths.root)}` follows them out of the queue, "
          f"`wattsweep resubmit {quoted(paths.root)}` runs them again")
    return 1 if refused else 0


def scancel(job_ids: list[str]) -> dict[str, str]:
    """Cancel Slurm jobs (array tasks as ``123_4``); job id -> scancel's reason
    for each it refused. scancel cancels what it can and names the rest."""
    from orchestrator.submit.shell import run_cmd

    refused: dict[str, str] = {}
    for start in range(0, len(job_ids), 500):  # keep the command line short
        chunk = job_ids[start:start + 500]
        proc = run_cmd(["scancel", *chunk], check=False)
        if proc.returncode == 0:
            continue
        named = False
        for line in (proc.stderr or "").splitlines():
            m = _JOB_ERROR.search(line)
            if m and m.group(1) in chunk:
                refused[m.group(1)] = line[m.end():].lstrip(": ").strip() or line.strip()
                named = True
        if not named:  # a failure not about one job (controller down): none of the chunk is known cancelled
            why = (proc.stderr or proc.stdout or f"scancel exited {proc.returncode}").strip().splitlines()[0]
            refused.update({jid: why for jid in chunk})
    return refused
