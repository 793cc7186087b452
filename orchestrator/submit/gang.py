"""The ranks of a local cell live and die together.

submitit's local controller waits for every task of a job and stops none when
one ends. A rank that died before the ranks joined (killed by the out-of-memory
killer, say) left the others waiting for it until the rendezvous timed out, ten
minutes later. ``GangWatch`` follows the task processes of a running cell; when
one has ended and the others still run ``GRACE_S`` later (ranks of a cell end
within a moment of each other, after their last barrier), the runner records
which rank ended first and stops the rest, as Slurm does with KillOnBadExit.
``WATTSWEEP_GANG_GRACE_S`` sets the grace.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

GRACE_S = 30.0


def grace_s() -> float:
    try:
        return max(0.0, float(os.environ.get("WATTSWEEP_GANG_GRACE_S", GRACE_S)))
    except ValueError:
        return GRACE_S


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started that still run (Linux's children list)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def task_rank(pid: int) -> int | None:
    """The global rank submitit gave task ``pid`` (its environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"SUBMITIT_LOCAL_GLOBALID="):
            try:
                return int(item.split(b"=", 1)[1])
            except ValueError:
                return None
    return None


@dataclass
class GangWatch:
    """One running cell of ``shards`` ranks under the controller ``controller_pid``."""

    controller_pid: int
    shards: int
    grace_s: float = field(default_factory=grace_s)
    ranks: dict[int, int] = field(default_factory=dict)  # task pid -> rank, of every task seen
    first_gone_s: float | None = None
    gone: list[int] = field(default_factory=list)  # ranks that ended while others ran

    def look(self, now: float | None = None) -> list[int] | None:
        """Follow the tasks; the ranks that ended first once the others outlived
        them by the grace (the runner then stops the cell), else None."""
        now = time.time() if now is None else now
        alive = set(child_pids(self.controller_pid))
        for pid in alive - self.ranks.keys():
            if (rank := task_rank(pid)) is not None:
                self.ranks[pid] = rank
        ended = sorted(r for pid, r in self.ranks.items() if pid not in alive)
        if not ended or not alive & self.ranks.keys():
            return None  # all run, or none is left (the controller ends next)
        if self.first_gone_s is None:
            self.first_gone_s, self.gone = now, ended
        return self.gone if now - self.first_gone_s >= self.grace_s else None
