"""Repair: put back every GPU of a node that still has a save file.

Used by ``wattsweep caps restore`` and so by the Slurm prolog and epilog.
A save file whose writer still runs on this host is skipped unless forced:
its own handlers will restore it, and a repair would pull the cap from
under a running measurement (another job's, on a shared node). Each repair
is recorded (``repair``) in the site ledger and in the ledgers of the
session that applied the cap, so the sweep's own audit sees it.
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from workers.gpu.base import GpuError
from workers.gpu.ledger import LedgerWriter, site_ledger_path
from workers.gpu.state import SaveFile, node_dir, node_name, owner_alive, read_saves


@dataclass(frozen=True)
class RepairOutcome:
    index: int
    status: str  # "repaired" | "skipped" | "failed"
    previous_w: float
    detail: str


def backend_for(save: SaveFile, state_dir: Path, node: str) -> Any:
    """The backend that can put this save file's GPU back."""
    kind = save.backend
    if kind == "simulated":
        from workers.gpu.simulated import SimulatedBackend

        return SimulatedBackend(profile=save.gpu_profile or "v100", state_dir=state_dir, node=node)
    if node != node_name():
        raise GpuError(f"GPU {save.index} of node {node} is a real card: run the restore on {node} itself")
    if kind == "nvidia-smi":
        from workers.gpu.nvidia_smi import NvidiaSmiBackend

        return NvidiaSmiBackend()
    from workers.gpu.nvml import NvmlBackend  # nvml, and capctl's cards (this runs as root there)

    return NvmlBackend()


def cell_ledgers(save: SaveFile) -> list[Path]:
    """The session's ledgers; as root only files that already exist and belong
    to the user who capped (a save file must not make root write elsewhere)."""
    if os.geteuid() != 0:
        return [Path(p) for p in save.ledgers]
    try:
        owner = pwd.getpwnam(save.user).pw_uid
    except (KeyError, TypeError):
        return []
    keep = []
    for p in map(Path, save.ledgers):
        try:
            if p.stat().st_uid == owner:
                keep.append(p)
        except OSError:
            continue
    return keep


def repair_node(state_dir: Path, node: str | None = None, *, indices: list[int] | None = None, force: bool = False,
                site_ledger: str | None = None, tolerance_w: float = 1.0,
                owner_running: Callable[[SaveFile], bool] = owner_alive) -> list[RepairOutcome]:
    """Restore every GPU of ``node`` (default: this one) with a save file, or
    only ``indices``. Never raises for one GPU: each outcome says what happened.
    ``owner_running``: whether the process that set a cap may still run (it
    will restore it then); this host can check only its own processes, so a
    caller looking at another host's saves passes a check that can (Slurm)."""
    from workers.gpu.caps import restore_from_save

    node = node or node_name()
    ndir = node_dir(state_dir, node)
    site = site_ledger_path(site_ledger)
    out = []
    for save in read_saves(ndir):
        if indices is not None and save.index not in indices:
            continue
        if not force and owner_running(save):
            out.append(RepairOutcome(save.index, "skipped", save.previous_w,
                                     f"pid {save.pid} on {save.host} ({save.user}, job {save.job_id}) still runs, or "
                                     f"cannot be checked from here, and will restore it; --force once it has ended"))
            continue
        ledger = LedgerWriter(([site] if site else []) + cell_ledgers(save))
        try:
            backend = backend_for(save, state_dir, node)
            try:
                restore_from_save(backend, ndir, save.uuid, ledger, action="repair", tolerance_w=tolerance_w,
                                  slurm={"job_id": save.job_id, "array_task_id": save.array_task_id, "user": save.user})
            finally:
                backend.close()
        except GpuError as exc:
            out.append(RepairOutcome(save.index, "failed", save.previous_w, str(exc)))
            continue
        out.append(RepairOutcome(save.index, "repaired", save.previous_w,
                                 f"back to {save.previous_w:g} W (capped by {save.user}, job {save.job_id}, cell {save.cell_id})"))
    return out
