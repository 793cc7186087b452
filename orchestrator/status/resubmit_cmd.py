"""``wattsweep resubmit SWEEP_DIR [--cells ID ...] [--force]``."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict

from orchestrator.contracts import SweepPaths
from orchestrator.plan.planned import PlannedCell, read_plan
from orchestrator.status.common import pick_cells, resolve_cells, run_on_sweep
from orchestrator.status.state import BEING_CANCELLED, RESUBMITTABLE, StatusError, SweepStatus, sweep_status
from orchestrator.submit.shell import SlurmCommandError

DESCRIPTION = """Resubmit exactly the cells that did not finish well: failed, cancelled, timed out,
missing (no marker and not in the queue), invalid (outputs fail validation) and
never-submitted ones. Each goes to the launcher recorded for it in the plan;
its earlier outputs are moved to cells/<id>/attempts/<n>/ first. Pending and
running cells are never resubmitted."""
EPILOG = """examples:
  wattsweep resubmit SWEEP_DIR
  wattsweep resubmit SWEEP_DIR --cells 3f2a9c01b7de 9be0       ids, or prefixes that name one cell
  wattsweep resubmit SWEEP_DIR --cells 3f2a9c01b7de --force     rerun a done cell
  wattsweep resubmit SWEEP_DIR --launcher time_min=240           cells that timed out, with more time
  wattsweep resubmit SWEEP_DIR --launcher partition=long gpus_per_node=4

--launcher changes only how the cells run (launcher.* keys: time, partition, resources),
never what they measure, so their ids stay the same. It applies to this resubmission
only: a later resubmit uses the sweep's settings again unless given --launcher too.
One command changes a sweep's cells at a time: a resubmit waits up to 120 s for a
sweep, resubmit or cancel of the same folder to finish."""

ACTIVE = frozenset({"pending", "running"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep folder")
    p.add_argument("--cells", nargs="+", metavar="ID", help="only these cells (ids from `wattsweep status`)")
    p.add_argument("--force", action="store_true", help="also rerun done cells")
    p.add_argument("--dry-run", action="store_true", help="say what would be submitted, submit nothing")
    p.add_argument("--launcher", nargs="+", default=[], metavar="KEY=VALUE",
                   help="change launcher settings of the resubmitted cells (e.g. time_min=240 partition=long)")


def run(args: argparse.Namespace) -> int:
    paths = SweepPaths.of(args.sweep_dir)

    def resubmit() -> int:
        return _run(args, paths, parse_launcher_changes(getattr(args, "launcher", []) or []))

    return run_on_sweep(paths, "resubmit", resubmit, lock=not args.dry_run)


def _run(args: argparse.Namespace, paths: SweepPaths, changes: dict) -> int:
    try:
        st = sweep_status(paths)
        if st.queue_error:
            # Without the queue a requeued or running cell looks failed or missing:
            # resubmitting now could run a cell twice.
            raise SlurmCommandError(["squeue"], f"cannot resubmit while Slurm cannot be asked ({st.queue_error}); try again on a node where squeue works")
        todo = choose(st, resolve_cells(paths, args.cells) if args.cells else None, args.force)
    except (StatusError, SlurmCommandError, ValueError) as e:
        print(f"wattsweep resubmit: {e}", file=sys.stderr)
        return 2
    if not todo:
        print(f"nothing to resubmit: {_summary(st)}")
        return 0
    return submit(paths, todo, dry_run=args.dry_run, changes=changes)


def choose(st: SweepStatus, cell_ids: list[str] | None, force: bool) -> list[str]:
    """Ids to resubmit, in plan order."""
    wanted = RESUBMITTABLE | ({"done"} if force else set())
    note = (lambda c: c.state + (" (use --force to rerun)" if c.state == "done" else ""))
    picked = [c.cell_id for c in pick_cells(st.cells, cell_ids, wanted, note)]
    if not cell_ids:  # named cells got their note above; say why a cancelled one is not rerun yet
        for c in st.cells:
            if c.state in ACTIVE and c.reason == BEING_CANCELLED:
                print(f"skipping {c.cell_id}: still being cancelled; resubmit it once it has ended")
    return picked


def parse_launcher_changes(items: list[str]) -> dict:
    """["time_min=240", "partition=long"] -> {"time_min": 240, "partition": "long"} (JSON values, else text)."""
    from orchestrator.cli import key_values

    try:
        pairs = key_values(items, "time_min=240")
    except ValueError as e:
        raise ValueError(f"--launcher {e}") from None
    out = {k.removeprefix("launcher."): v for k, v in pairs.items()}
    if "name" in out:
        raise ValueError("--launcher name=...: a cell keeps its launcher; plan a new sweep for another one")
    return out


def _with_changes(cell: PlannedCell, changes: dict) -> PlannedCell:
    """The cell with its launcher settings changed, each key checked against
    the launcher's own (the ids stay: launcher settings are not measured)."""
    import dataclasses

    from orchestrator.config.schema import LocalLauncherConf, SlurmLauncherConf
    from orchestrator.config.validate import ConfigError, validate_launcher

    name = str(cell.launcher.get("name") or "local")
    fields = [f for f in dataclasses.fields(SlurmLauncherConf if name == "slurm" else LocalLauncherConf) if f.name != "name"]
    known = [f.name for f in fields]
    unknown = [k for k in changes if k not in known]
    if unknown:
        raise ValueError(f"--launcher {unknown[0]}: not a setting of the {name} launcher; valid: {', '.join(known)}")
    launcher = {**cell.launcher, **changes}
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    try:
        validate_launcher({**defaults, **launcher})  # judged with the settings the job will run with
    except ConfigError as e:
        raise ValueError(f"--launcher: {e}") from None
    return dataclasses.replace(cell, launcher=launcher)


def submit(paths: SweepPaths, cell_ids: list[str], *, dry_run: bool = False, changes: dict | None = None) -> int:
    from orchestrator.submit.base import LaunchError, get_launcher

    plan = {c.cell_id: c for c in read_plan(paths)}
    groups: dict[str, list[PlannedCell]] = defaultdict(list)
    for cid in cell_ids:
        cell = _with_changes(plan[cid], changes) if changes else plan[cid]
        groups[str(cell.launcher.get("name") or "local")].append(cell)
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
