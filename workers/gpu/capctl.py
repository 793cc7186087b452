"""``wattsweep-capctl``: the privileged cap helper, and the backend that calls it.

For sites where jobs do not run as root. The site allows
``sudo -n wattsweep-capctl`` (sudoers line in docs/admin.md); the helper
then does, as root, only this: set a GPU's limit after checking the card's
range and the site policy, keep the GPU's save file in the site state
folder, and append to the site ledger, which users cannot write. Setting a
GPU back to its saved previous value is a ``restore`` and always allowed.

    wattsweep-capctl set --index I --watts W [--cell-id C] [--job-id J] ...
    wattsweep-capctl restore --index I       repair from the save file (no-op without one)
    wattsweep-capctl show [--index I]        limits and save files, JSON lines

Configuration: /etc/wattsweep/capctl.yaml (keys: backend nvml|nvidia-smi|
simulated, state_dir, site_ledger, policy, gpu_profile, tolerance_w).
$WATTSWEEP_CAPCTL_CONFIG names another file only when not run through sudo,
so a user cannot point the root helper at files of their choosing.
Exit codes: 0 ok, 2 error, 3 no permission or policy breach, 4 out of the
card's range, 5 enforced differs from requested, 6 GPU lost.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from workers.gpu.base import (CapMismatchError, CapPermissionError, CapRangeError, GpuBackend, GpuError, GpuInfo,
                              GpuLostError, GpuSample)
from workers.gpu.errors import PERMISSION_FIX, range_error
from workers.gpu.ledger import LedgerWriter, make_record, site_ledger_path
from workers.gpu.policy import PolicyError, load_policy
from workers.gpu.state import (current_user, make_save, node_dir, owner_alive, read_save, read_saves, resolve_state_dir,
                               write_save)

SITE_CONFIG = Path("/etc/wattsweep/capctl.yaml")
DEFAULT_COMMAND = ("sudo", "-n", "wattsweep-capctl")
EXIT_CODES = {CapPermissionError: 3, CapRangeError: 4, CapMismatchError: 5, GpuLostError: 6}


@dataclass(frozen=True)
class CapctlConfig:
    backend: str = "nvml"
    state_dir: str | None = None
    site_ledger: str | None = None
    policy: str | None = None
    gpu_profile: str = "v100"
    tolerance_w: float = 1.0


def load_config() -> CapctlConfig:
    under_sudo = "SUDO_UID" in os.environ
    path = SITE_CONFIG if under_sudo else Path(os.environ.get("WATTSWEEP_CAPCTL_CONFIG") or SITE_CONFIG)
    if not path.exists():
        return CapctlConfig()
    data = yaml.safe_load(path.read_text()) or {}
    known = set(CapctlConfig.__dataclass_fields__)
    if not isinstance(data, dict) or set(data) - known:
        raise GpuError(f"{path}: expected a mapping with keys {sorted(known)}")
    return CapctlConfig(**data)


def _underlying(cfg: CapctlConfig) -> Any:
    if cfg.backend == "nvml":
        from workers.gpu.nvml import NvmlBackend

        return NvmlBackend()
    if cfg.backend == "nvidia-smi":
        from workers.gpu.nvidia_smi import NvidiaSmiBackend

        return NvidiaSmiBackend()
    if cfg.backend == "simulated":
        from workers.gpu.simulated import SimulatedBackend

        return SimulatedBackend(profile=cfg.gpu_profile, state_dir=cfg.state_dir)
    raise GpuError(f"capctl config: backend {cfg.backend!r}; valid: nvml, nvidia-smi, simulated")


def _device(b: Any, index: int) -> GpuInfo:
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # the helper addresses physical indices
    for d in b.devices():
        if d.index == index:
            return d
    raise GpuError(f"no GPU {index} on this node")


def _cmd_set(cfg: CapctlConfig, a: argparse.Namespace) -> int:
    b = _underlying(cfg)
    ndir = node_dir(resolve_state_dir(cfg.state_dir))
    site = site_ledger_path(cfg.site_ledger)
    ledger = LedgerWriter([site] if site else [])
    user = os.environ.get("SUDO_USER") or current_user()
    slurm = {"job_id": a.job_id, "array_task_id": a.array_task_id, "user": user, "partition": a.partition,
             "account": a.account}
    info = _device(b, a.index)
    save = read_save(ndir, info.uuid)
    if save is not None and abs(a.watts - save.previous_w) <= cfg.tolerance_w:
        from workers.gpu.caps import restore_from_save

        restore_from_save(b, ndir, info.uuid, ledger, action="restore", cell_id=a.cell_id, slurm=slurm,
                          tolerance_w=cfg.tolerance_w)
        return 0
    if not info.min_limit_w <= a.watts <= info.max_limit_w:
        raise range_error(a.index, a.watts, info.min_limit_w, info.max_limit_w)
    if cfg.policy:
        reason = load_policy(cfg.policy).check(gpu_name=info.name, partition=a.partition, power_cap_w=a.watts,
                                               user=user, account=a.account)
        if reason:
            raise CapPermissionError(f"site policy refuses {a.watts:g} W on GPU {a.index}: {reason}")
    previous = b.get_power_limit_w(a.index)
    if save is None:  # first change: the value to come back to
        write_save(ndir, make_save(a.index, info.uuid, info.name, previous, a.watts, backend=b.name,
                                   gpu_profile=cfg.gpu_profile if b.name == "simulated" else None,
                                   cell_id=a.cell_id, slurm=slurm, owner_pid=a.owner_pid,
                                   ledgers=tuple(a.ledger)))
    rec = dict(index=a.index, uuid=info.uuid, name=info.name, previous_w=save.previous_w if save else previous,
               requested_w=a.watts, cell_id=a.cell_id, slurm=slurm, backend="capctl", user=user)
    ledger.check_writable()
    try:
        b.set_power_limit_w(a.index, a.watts)
        enforced = b.get_power_limit_w(a.index)
    except GpuError as exc:
        ledger.append(make_record(action="apply", result="failed", enforced_w=None, error=str(exc), **rec), strict=False)
        raise
    if abs(enforced - a.watts) > cfg.tolerance_w:
        err = f"GPU {a.index} enforces {enforced:g} W after a request of {a.watts:g} W"
        ledger.append(make_record(action="apply", result="failed", enforced_w=enforced, error=err, **rec), strict=False)
        raise CapMismatchError(err)
    ledger.append(make_record(action="apply", result="ok", enforced_w=enforced, **rec))
    return 0


def _cmd_restore(cfg: CapctlConfig, a: argparse.Namespace) -> int:
    from workers.gpu.caps import restore_from_save

    from workers.gpu.repair import cell_ledgers

    ndir = node_dir(resolve_state_dir(cfg.state_dir))
    b = _underlying(cfg)
    save = read_save(ndir, _device(b, a.index).uuid)
    if save is None:
        return 0
    if owner_alive(save):
        raise GpuError(f"GPU {a.index} is capped by a running process: pid {save.pid} ({save.user}, job "
                       f"{save.job_id}, cell {save.cell_id}); two cells must not share a GPU")
    site = site_ledger_path(cfg.site_ledger)
    ledger = LedgerWriter(([site] if site else []) + cell_ledgers(save))  # recorded where the apply was
    restore_from_save(b, ndir, save.uuid, ledger, action="repair", tolerance_w=cfg.tolerance_w)
    return 0


def _cmd_show(cfg: CapctlConfig, a: argparse.Namespace) -> int:
    b = _underlying(cfg)
    saves = {s.uuid: s for s in read_saves(node_dir(resolve_state_dir(cfg.state_dir)))}
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    for d in b.devices():
        if a.index is None or d.index == a.index:
            s = saves.get(d.uuid)
            print(json.dumps({"index": d.index, "uuid": d.uuid, "name": d.name, "limit_w": b.get_power_limit_w(d.index),
                              "min_w": d.min_limit_w, "max_w": d.max_limit_w, "default_w": d.default_limit_w,
                              "saved_previous_w": s.previous_w if s else None}))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattsweep-capctl", description="Set or restore a GPU power limit (privileged helper).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("set", help="set a limit (a value equal to the saved previous one restores)")
    s.add_argument("--index", type=int, required=True)
    s.add_argument("--watts", type=float, required=True)
    for opt in ("--cell-id", "--job-id", "--array-task-id", "--partition", "--account"):
        s.add_argument(opt)
    s.add_argument("--owner-pid", type=int, help="the job process whose end makes the save file stale")
    s.add_argument("--ledger", action="append", default=[], help="the session's ledger, for repair records (repeatable)")
    r = sub.add_parser("restore", help="restore a GPU from its save file")
    r.add_argument("--index", type=int, required=True)
    sh = sub.add_parser("show", help="limits and save files")
    sh.add_argument("--index", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        cfg = load_config()
        return {"set": _cmd_set, "restore": _cmd_restore, "show": _cmd_show}[a.cmd](cfg, a)
    except (GpuError, PolicyError, OSError) as exc:
        print(f"wattsweep-capctl: {exc}", file=sys.stderr)
        return next((code for cls, code in EXIT_CODES.items() if isinstance(exc, cls)), 2)


# ---------------------------------------------------------------------------
# The backend: reads through an unprivileged backend, writes through the helper
# ---------------------------------------------------------------------------


def helper_command(configured: Any = None) -> list[str]:
    """The helper's argv prefix: configured (list or string), else
    $WATTSWEEP_CAPCTL_COMMAND, else ``sudo -n wattsweep-capctl``."""
    value = configured or os.environ.get("WATTSWEEP_CAPCTL_COMMAND")
    if not value:
        return list(DEFAULT_COMMAND)
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


class CapctlBackend:
    name = "capctl"
    helper_managed = True  # the helper keeps the save files and writes the site ledger

    def __init__(self, reader: GpuBackend, *, command: list[str] | None = None, observe_only: bool = False):
        self.reader = reader
        self.source = reader.source
        self.command = command or helper_command()
        self.observe_only = observe_only
        self.would_set: dict[int, float] = {}
        self.context: dict[str, Any] = {}

    def set_context(self, *, cell_id: str | None, slurm: dict | None, ledgers: tuple[str, ...] = ()) -> None:
        self.context = {"cell_id": cell_id, **(slurm or {}), "ledgers": tuple(map(str, ledgers))}

    def _run(self, args: list[str]) -> None:
        c = self.context
        extra = []
        if args[0] == "set":
            for flag, key in (("--cell-id", "cell_id"), ("--job-id", "job_id"), ("--array-task-id", "array_task_id"),
                              ("--partition", "partition"), ("--account", "account")):
                if c.get(key):
                    extra += [flag, str(c[key])]
            for path in c.get("ledgers", ()):
                extra += ["--ledger", path]  # where a later repair is recorded too
            extra += ["--owner-pid", str(os.getpid())]
        cmd = [*self.command, *args, *extra]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        except FileNotFoundError:
            raise CapPermissionError(f"`{cmd[0]}` not found: install sudo and wattsweep-capctl, or {PERMISSION_FIX}") from None
        msg = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        if proc.returncode in (0, 5):
            return  # 5: enforced differs; the cap session reads back and fails the cell itself
        if proc.returncode == 1 and "sudo" in msg:
            raise CapPermissionError(f"sudo refused `{' '.join(cmd)}` ({msg}): add the sudoers rule from "
                                     f"docs/admin.md, or {PERMISSION_FIX}")
        cls = {3: CapPermissionError, 4: CapRangeError, 6: GpuLostError}.get(proc.returncode, GpuError)
        raise cls(msg)

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if self.observe_only:
            self.would_set[index] = float(watts)
            return
        self._run(["set", "--index", str(index), "--watts", f"{watts:g}"])

    def repair(self, index: int) -> None:
        """Restore ``index`` from the helper's save file (no-op without one)."""
        if not self.observe_only:
            self._run(["restore", "--index", str(index)])

    def devices(self) -> list[GpuInfo]:
        return self.reader.devices()

    def get_power_limit_w(self, index: int) -> float:
        return self.reader.get_power_limit_w(index)

    def sample(self, index: int) -> GpuSample:
        return self.reader.sample(index)

    def energy_j(self, index: int) -> float | None:
        return self.reader.energy_j(index)

    def note_activity(self, index: int, phase: str, load: float) -> None:
        self.reader.note_activity(index, phase, load)

    def close(self) -> None:
        self.reader.close()


if __name__ == "__main__":
    sys.exit(main())
