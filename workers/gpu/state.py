"""Where a node keeps its cap state: the state folder, per-GPU save files.

A save file holds a GPU's limit from before the first change. It is written
(and fsync'd) before the card is touched and removed only after the previous
value is back, so a save file on disk always means "this GPU may be capped and
here is what it should return to". The epilog, ``wattsweep caps restore`` and
the next cap session on the GPU repair from it.

Layout: ``STATE_DIR/nodes/<node>/caps/gpu-<uuid>.json`` (and the simulated
cards' state next to it). The node level lets several nodes share one folder
(a development cluster on one machine, a shared file system) without
touching each other's GPUs. Save files are named by the card's UUID, not its
index: under Slurm's device cgroups every job numbers its own GPUs from 0, so
two jobs on one node each have a "GPU 0", and the epilog, outside any job,
numbers them differently again. Whoever restores finds the index by UUID.
"""
from __future__ import annotations

import dataclasses
import getpass
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.contracts import atomic_write_json

SITE_STATE_DIR = Path("/var/lib/wattsweep")


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def node_name() -> str:
    """Slurm's name for this node when inside Slurm (prolog, epilog and jobs
    all see SLURMD_NODENAME), else the short host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def resolve_state_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """The state folder: the configured one, else $WATTSWEEP_STATE_DIR, else
    /var/lib/wattsweep when writable (root, or a site that made it so), else
    $TMPDIR/wattsweep-<user>. A per-job TMPDIR is wiped with the job, so a
    site that wants the epilog to repair must configure a lasting folder."""
    explicit = configured or os.environ.get("WATTSWEEP_STATE_DIR")
    if explicit:
        return Path(explicit)
    if _writable_dir(SITE_STATE_DIR):
        return SITE_STATE_DIR
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    return tmp / f"wattsweep-{current_user()}"


def node_dir(state_dir: Path, node: str | None = None) -> Path:
    return Path(state_dir) / "nodes" / (node or node_name())


def list_nodes(state_dir: Path) -> list[str]:
    root = Path(state_dir) / "nodes"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@dataclass(frozen=True)
class SaveFile:
    """One GPU's limit from before the first change, and who changed it."""

    index: int
    uuid: str
    name: str
    previous_w: float
    requested_w: float | None
    backend: str  # backend that will restore it: "nvml" | "nvidia-smi" | "capctl" | "simulated"
    gpu_profile: str | None  # simulated cards only
    cell_id: str | None
    job_id: str | None
    array_task_id: str | None
    user: str
    host: str
    pid: int
    pid_start: str | None  # /proc start time: a recycled pid is not the owner
    created_unix_s: float
    ledgers: tuple[str, ...] = ()  # the cap session's ledgers: a repair is recorded where the apply was

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SaveFile":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: d.get(k) for k in names}
        values["ledgers"] = tuple(d.get("ledgers") or ())
        return cls(**values)


def save_path(ndir: Path, uuid: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uuid)
    return Path(ndir) / "caps" / f"gpu-{safe}.json"


def process_start(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def make_save(index: int, uuid: str, name: str, previous_w: float, requested_w: float | None, *,
              backend: str, gpu_profile: str | None, cell_id: str | None, slurm: dict | None,
              owner_pid: int | None = None, ledgers: tuple[str, ...] = ()) -> SaveFile:
    """owner_pid: the process whose end makes the save file stale (default:
    this one; the capctl helper passes the job's worker, as it exits at once)."""
    slurm = slurm or {}
    pid = owner_pid or os.getpid()
    return SaveFile(index, uuid, name, float(previous_w), requested_w, backend, gpu_profile, cell_id,
                    slurm.get("job_id"), slurm.get("array_task_id"), slurm.get("user") or current_user(), socket.gethostname(),
                    pid, process_start(pid), time.time(), tuple(str(p) for p in ledgers))


def write_save(ndir: Path, save: SaveFile) -> Path:
    path = save_path(ndir, save.uuid)
    atomic_write_json(path, save.to_dict())
    _fsync_dir(path.parent)  # the rename itself must survive a crash
    return path


def read_save(ndir: Path, uuid: str) -> SaveFile | None:
    path = save_path(ndir, uuid)
    try:
        with open(path) as f:
            return SaveFile.from_dict(json.load(f))
    except FileNotFoundError:
        return None


def read_saves(ndir: Path) -> list[SaveFile]:
    folder = Path(ndir) / "caps"
    out = []
    for path in sorted(folder.glob("gpu-*.json")) if folder.is_dir() else []:
        try:
            with open(path) as f:
                out.append(SaveFile.from_dict(json.load(f)))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"save file {path} is unreadable ({exc}); fix or remove it by hand") from exc
    return sorted(out, key=lambda s: s.index)


def remove_save(ndir: Path, uuid: str) -> None:
    try:
        os.unlink(save_path(ndir, uuid))
    except FileNotFoundError:
        return
    _fsync_dir(save_path(ndir, uuid).parent)


def owner_alive(save: SaveFile) -> bool:
    """True while the process that wrote the save file still runs on this host
    (then its own handlers will restore; a repair would pull the cap from
    under a running measurement)."""
    if save.host != socket.gethostname():
        return False
    start = process_start(save.pid)
    if start is None:
        return False
    return save.pid_start is None or start == save.pid_start


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
