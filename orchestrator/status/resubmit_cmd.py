"""``wattsweep resubmit SWEEP_DIR [--cells ID ...] [--force]``."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from orchestrator.contracts import SweepPaths
from orchestrator.plan.planned import PlannedCell, read_plan
from orchestrator.status.state import RESUBMITTABLE, StatusError, SweepStatus, sweep_status
from orchestrator.submit.shell import SlurmCommandError

DESCRIPTION = """Resubmit exactly the cells that did not finish well: failed, cancelled, timed out,
missing (no marker and not in the queue), invalid (outputs fail validation) and
never-submitted ones. Each goes to the launcher recorded for it in the plan;
its earlier outputs are moved to cells/<id>/attempts/<n>/ first. Pending and
running cells are never resubmitted."""
EPILOG = """examples:
  wattsweep resubmit SWEEP_DIR
  wattsweep resubmit SWEEP_DIR --cells 3f2a9c01b7de 9be0c4d1aa02
  wattsweep resubmit SWEEP_DIR --cells 3f2a9c01b7de --force     rerun a done cell"""

ACTIVE = frozenset({"pending", "running"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cells (ids from `wattsweep status`)")
    p.add_argument("--force", action="store_true", help="also rerun done cells")
    p.add_argument("--dry-run", action="store_true", help="say what would be submitted, submit nothing")


def run(args: argparse.Namespace) -> int:
    paths = SweepPaths.of(args.sweep_dir)
    try:
        st = sweep_status(paths)
        if st.queue_error:
            # Without the queue a requeued or running cell looks failed or missing:
            # resubmitting now could run a cell twice.
            raise SlurmCommandError(["squeue"], f"cannot resubmit while Slurm cannot be asked ({st.queue_error}); try again on a node where squeue works")
        todo = choose(st, args.cells, args.force)
    except (StatusError, SlurmCommandError, ValueError) as e:
        print(f"wattsweep resubmit: {e}", file=sys.stderr)
        return 2
    if not todo:
        print(f"nothing to resubmit: {_summary(st)}")
        return 0
    return submit(paths, todo, dry_run=args.dry_run)


def choose(st: SweepStatus, cell_ids: list[str] | None, force: bool) -> list[str]:
    """Ids to resubmit, in plan order."""
    wanted = RESUBMITTABLE | ({"done"} if force else set())
    by_id = {c.cell_id: c for c in st.cells}
    if cell_ids:
        unknown = [c for c in cell_ids if c not in by_id]
        if unknown:
            raise ValueError(f"unknown cell id(s) {' '.join(unknown)}; valid: ids listed by `wattsweep status {st.sweep_dir}`")
        for cid in cell_ids:
            s = by_id[cid].state
            if s not in wanted:
                print(f"skipping {cid}: {s}" + (" (use --force to rerun)" if s == "done" else ""))
    picked = set(cell_ids) if cell_ids else set(by_id)
    return [c.cell_id for c in st.cells if c.cell_id in picked and c.state in wanted]


def submit(paths: SweepPaths, cell_ids: list[str], *, dry_run: bool = False) -> int:
    from orchestrator.submit.base import LaunchError, get_launcher

    plan = {c.cell_id: c for c in read_plan(paths)}
    groups: dict[str, list[PlannedCell]] = defaultdict(list)
    for cid in cell_ids:
        groups[str(plan[cid].launcher.get("name") or "local")].append(plan[cid])
    rc, n = 0, 0
    for name, cells in groups.items():
        try:
            launcher = get_launcher(name, cells[0].launcher)
            records = launcher.submit(paths, cells, dry_run=dry_run)
        except (LaunchError, SlurmCommandError) as e:
            print(f"wattsweep resubmit: {e}", file=sys.stderr)
            rc = 1
            continue
        n += sum(len(r.cell_ids) for r in records)
        for r in records:
            print(f"resubmitted {' '.join(r.cell_ids)} -> {' '.join(r.job_ids)}")
    if not dry_run:
        print(f"resubmitted {n} cell(s)")
    return rc


def _summary(st: SweepStatus) -> str:
    return ", ".join(f"{n} {s}" for s, n in st.counts.items() if n) or "no cells"
