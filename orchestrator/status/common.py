"""What the commands that act on a sweep's cells share (resubmit, cancel)."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Collection

from orchestrator.contracts import SweepPaths
from orchestrator.status.state import CellStatus, StatusError, require_sweep
from orchestrator.submit.shell import quoted


# How long resubmit and cancel wait for another command that holds the sweep
# (a sweep still submitting its arrays, another resubmit).
LOCK_WAIT_S = 120.0


def run_on_sweep(paths: SweepPaths, command: str, fn: Callable[[], int], *, lock: bool = True) -> int:
    """``fn()`` for an existing sweep folder, under the submitters' lock when
    ``lock`` (a resubmit and a cancel running at once would each act on cells
    the other is changing). A folder that is not a sweep is refused before
    the lock file is written; errors are one line and exit status 2."""
    from orchestrator.submit.base import LaunchError, submit_lock

    try:
        require_sweep(paths)
        with contextlib.ExitStack() as held:
            if lock:
                try:
                    held.enter_context(submit_lock(paths, command, wait_s=LOCK_WAIT_S))
                except OSError as e:  # a read-only folder, a full disk: only the lock's errors read so
                    raise StatusError(f"cannot take the lock {paths.root / '.submit.lock'} ({e.strerror}); "
                                      f"nothing was changed") from None
            return fn()
    except (StatusError, LaunchError, ValueError) as e:
        print(f"wattsweep {command}: {e}", file=sys.stderr)
        return 2


def pick_cells(cells: tuple[CellStatus, ...], cell_ids: list[str] | None, wanted: Collection[str],
               skip_note: Callable[[CellStatus], str]) -> list[CellStatus]:
    """Cells in a ``wanted`` state, in plan order; only those of ``cell_ids`` when
    given (an unknown id is refused, a named cell in another state is noted)."""
    by_id = {c.cell_id: c for c in cells}
    if cell_ids:
        unknown = [c for c in cell_ids if c not in by_id]
        if unknown:
            raise ValueError(f"unknown cell id(s) {' '.join(unknown)}; valid: ids listed by `wattsweep status`")
        for cid in cell_ids:
            if by_id[cid].state not in wanted:
                print(f"skipping {cid}: {skip_note(by_id[cid])}")
    picked = set(cell_ids) if cell_ids else set(by_id)
    return [c for c in cells if c.cell_id in picked and c.state in wanted]


def resolve_cell(paths: SweepPaths, given: str, ids: list[str] | None = None) -> str:
    """The planned cell id ``given`` names, in full or by a unique prefix
    (``ids``: the plan's cell ids, when the caller has read them)."""
    if ids is None:
        ids = _plan_ids(paths)
    if given in ids:
        return given
    matches = [c for c in ids if c.startswith(given)] if given else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = ", ".join(matches[:4]) + (", ..." if len(matches) > 4 else "")
        raise ValueError(f"cell prefix {given!r} names {len(matches)} cells ({shown}); give more of the id")
    raise ValueError(f"no cell {given!r} in {paths.root}; valid: ids listed by `wattsweep status {quoted(paths.root)}`")


def resolve_cells(paths: SweepPaths, given: list[str]) -> list[str]:
    """Each of ``given`` as a full cell id (prefixes resolved; duplicates dropped)."""
    ids = _plan_ids(paths)
    return list(dict.fromkeys(resolve_cell(paths, g, ids) for g in given))


def _plan_ids(paths: SweepPaths) -> list[str]:
    from orchestrator.plan.planned import PlanFileError, read_plan

    try:
        return [c.cell_id for c in read_plan(paths)]
    except PlanFileError as e:
        raise StatusError(str(e)) from None
