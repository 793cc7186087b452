"""Which of this machine's GPUs a local cell holds, across every local runner.

Runners of one sweep take turns (``local.earlier_still_running``), but runners of
two sweeps, or of two users, on one workstation used to start cells on the same
GPUs: two cells then shared a card, and a cell that restored its cap pulled the
other's. A runner now leases a GPU before it starts a cell on it, in a folder
every local user of the machine shares (``$WATTSWEEP_LEASE_DIR``, else
``/tmp/wattsweep-gpu-leases``, sticky and writable by all).

One file per GPU, ``gpu-<uuid>.json`` (``gpu-<index>.json`` where the card's UUID
is not known: no NVML, a simulated node), rewritten in place under one ``flock``
(``.lock``); an empty file is a free GPU. The UUID and not the index, because
two allocations on one node (Slurm with device cgroups) each number their own
cards from 0: by index, they took turns on GPUs they did not share.

A lease names its holders: the runner that took it (pid and start time) and,
once started, the cell's submitit controller. It stays held while either runs
(a runner killed with ``kill -9`` leaves its cells running, and their GPUs stay
leased). A lease whose holders have ended is free: nothing has to clean up
after a crash. Files are rewritten, never replaced, so another user's lease file
in the sticky folder can still be taken over once its holders have ended.

A cell that finds too few GPUs free joins ``waiting.json``, oldest first, and a
claim may not take a GPU that a cell waiting longer needs (each waiting cell,
oldest first, keeps back as many free GPUs of its list as it needs): without
it, a runner of one-GPU cells took each GPU as it freed, and a two-GPU cell of
another sweep waited for ever. A waiting cell whose own runner still runs a
cell on one of its GPUs keeps nothing back, or the GPUs kept would idle for
the whole of that cell. A card leased under its index (by a runner that had
no UUID for it) counts as held for a runner that knows its UUID too. The oldest waiter leaves the
queue when it gets its GPUs, when its runner moves on to another cell or has
none left (``withdraw``), or when its runner ends; a runner is known by its
pid and the time it started, so a pid reused since does not keep a place.

The folder is shared, so nothing in it is trusted: a lease file is opened without
following a symbolic link, without blocking, and used only when it is a regular
file with one name (a link planted there would otherwise have this user's runner
truncate, and open to all, a file elsewhere). Anything else is refused by name.
"""
from __future__ import annotations

import errno
import fcntl
import stat
import getpass
import json
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_DIR = Path("/tmp/wattsweep-gpu-leases")
QUEUE_NAME = "waiting.json"


def lease_dir() -> Path:
    return Path(os.environ.get("WATTSWEEP_LEASE_DIR") or DEFAULT_DIR)


class LeaseError(RuntimeError):
    """The lease folder or one of its files cannot be used; the message says
    which and what to do."""


def _as_pid(x: Any) -> int | None:
    """A process id as a lease or a job id holds it (an int, or digits), else None:
    JSON from a shared folder may hold anything (true, 1.5, Infinity)."""
    if isinstance(x, int) and not isinstance(x, bool):
        pid = x
    elif isinstance(x, str) and x.isascii() and x.isdigit():
        pid = int(x)
    else:
        return None
    return pid if 0 < pid < 1 << 22 else None  # the kernel's pid_max is at most 2**22


def pid_alive(pid: Any) -> bool:
    """A process ``pid`` runs (a zombie has ended; another user's process counts,
    also where /proc hides it: ``hidepid``)."""
    pid = _as_pid(pid)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # another user's process
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # /proc hides it: alive, as kill said


def controller_alive(job_id: Any) -> bool:
    """The submitit local controller of job ``job_id`` (its pid) still runs:
    the pid is alive and still that program, not a pid reused since."""
    pid = _as_pid(job_id)
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"submitit" in cmdline and pid_alive(pid)


def start_ticks(pid: Any) -> int | None:
    """When process ``pid`` started (clock ticks since boot); None if it does not
    run or /proc does not show it."""
    pid = _as_pid(pid)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (ValueError, IndexError, OSError):
        return None


def same_process(pid: Any, start: Any) -> bool:
    """``pid`` runs and is the process that started at ``start`` (clock ticks);
    where /proc hides its start time (``hidepid``), alive is taken as the same."""
    if not pid_alive(pid):
        return False
    ticks = start_ticks(pid)
    return start is None or ticks is None or ticks == start


def held(record: dict[str, Any]) -> bool:
    """A lease is held while the runner that took it runs (it releases the lease
    when the cell ends) or while the cell's controller runs (a runner killed with
    kill -9 leaves its cells running). Not the controller alone: for a moment
    after it starts, its /proc cmdline is still the runner's, inside exec."""
    if _runner_alive(record):
        return True
    return record.get("controller_pid") is not None and controller_alive(record["controller_pid"])


def _runner_alive(record: dict[str, Any]) -> bool:
    """The runner that took the lease still runs: its pid, and the start time the
    lease names (a runner killed with kill -9 whose pid another process took since
    does not hold it). Leases written without a start time go by the pid alone."""
    return same_process(record.get("runner_pid"), record.get("runner_start"))


# What a UUID may hold to name a lease file: NVML's are GPU-<hex and dashes>.
_UUID = re.compile(r"GPU-[0-9A-Za-z-]{1,64}")
# A GPU's name in the folder: a UUID as above, or an index.
_KEY = re.compile(r"GPU-[0-9A-Za-z-]{1,64}|[0-9]{1,6}")


class GpuLeases:
    """Leases of GPUs named by index; ``uuids`` (index -> the card's UUID) names
    their files, where known."""

    def __init__(self, folder: Path | None = None, uuids: Mapping[int, str] | None = None,
                 pid: int | None = None) -> None:
        """``pid``: the runner these leases are for (this process unless given)."""
        self.folder = Path(folder) if folder is not None else lease_dir()
        self.uuids = {int(i): u for i, u in (uuids or {}).items() if _UUID.fullmatch(u)}
        self.pid = os.getpid() if pid is None else int(pid)
        self.start = start_ticks(self.pid)  # with the pid, names this runner in leases and the line
        # the waiting cell that kept the last refused claim back, for messages
        self.queued_ahead: dict[str, Any] | None = None

    def check(self, gpus: list[int]) -> None:
        """Raise LeaseError now (at submission) for what would stop a runner later."""
        with self._locked():
            for path in [*(self._path(g) for g in gpus), self.folder / QUEUE_NAME]:
                os.close(_open_shared(path))

    # -- the three things a runner does --------------------------------------
    def claim(self, gpus: list[int], n: int, *, sweep: str, cell_id: str) -> list[int] | None:
        """Lease ``n`` of ``gpus`` for ``cell_id`` (held by this runner until
        ``bind``); None when fewer than ``n`` are free now, or when taking them
        would leave too few for cells that have waited longer (the cell then
        waits in turn)."""
        with self._locked():
            queue = self._live_queue()
            mine = next((w for w in queue if w["runner_pid"] == self.pid), None)
            if mine is not None and mine["cell_id"] != cell_id:
                queue.remove(mine)  # this runner moved on to another cell: it waits anew
                mine = None
            ahead = sorted((w for w in queue if w is not mine
                            and (mine is None or w["since_unix_s"] < mine["since_unix_s"])),
                           key=lambda w: w["since_unix_s"])
            take, self.queued_ahead = self._choose(gpus, n, ahead)
            if take is None:
                if mine is None:
                    queue.append({"runner_pid": self.pid, "runner_start": self.start, "sweep": sweep,
                                  "cell_id": cell_id, "user": _user(), "n": int(n),
                                  "gpus": [self._key(g) for g in gpus], "since_unix_s": time.time()})
                self._write_queue(queue)
                return None
            if mine is not None:
                queue.remove(mine)
            self._write_queue(queue)
            record = {"runner_pid": self.pid, "runner_start": self.start, "controller_pid": None,
                      "sweep": sweep, "cell_id": cell_id, "user": _user(), "since_unix_s": time.time()}
            for g in take:
                self._write(g, record)
            return take

    def withdraw(self) -> None:
        """This runner waits for no GPU any more (its cells started, or were cancelled)."""
        with self._locked():
            queue = self._live_queue()
            kept = [w for w in queue if w["runner_pid"] != self.pid]
            if len(kept) != len(queue):
                self._write_queue(kept)

    def _choose(self, gpus: list[int], n: int, ahead: list[dict[str, Any]]
                ) -> tuple[list[int] | None, dict[str, Any] | None]:
        """``n`` of ``gpus`` that are free once every cell waiting longer
        (``ahead``, oldest first) has kept back as many free GPUs of its own list
        as it needs, those this claim cannot use first. A waiting cell whose own
        runner still runs a cell on one of its GPUs keeps none back: that cell
        may run for hours, and the GPUs kept would idle as long. Returns the GPUs
        (None if too few) and the waiting cell that kept back what was missing."""
        keys = {self._key(g) for g in gpus}
        records = {self._key(g): self._read_held(g) for g in gpus}
        records.update((k, self._held_record(k)) for w in ahead for k in w["gpus"] if k not in records)
        free = {k for k, r in records.items() if r is None}
        mine_free = len(free & keys)
        blocker = None
        for w in ahead:
            if any(r is not None and r.get("runner_pid") == w["runner_pid"] for k, r in records.items()
                   if k in w["gpus"]):
                continue
            usable = sorted(free.intersection(w["gpus"]), key=lambda k: (k in keys, k))
            kept = usable[: w["n"]]
            free.difference_update(kept)
            if blocker is None and len(free & keys) < n <= mine_free:
                blocker = w
        take = [g for g in gpus if self._key(g) in free][:n]
        return (take, None) if len(take) == n else (None, blocker)

    def bind(self, gpus: list[int], controller_pid: int) -> None:
        """The cell started: its controller holds the leases from now on."""
        with self._locked():
            for g in gpus:
                record = self._read(g) or {}
                if record.get("runner_pid") == self.pid:
                    self._write(g, {**record, "controller_pid": int(controller_pid)})

    def release(self, gpus: list[int]) -> None:
        """Free this runner's leases of ``gpus`` (the cell ended, or never started)."""
        with self._locked():
            for g in gpus:
                record = self._read(g)
                if record and record.get("runner_pid") == self.pid:
                    self._write(g, None)

    # -- reading, for messages ------------------------------------------------
    def holders(self, gpus: list[int]) -> dict[int, dict[str, Any]]:
        """GPU -> the lease that holds it, for the GPUs that are held."""
        with self._locked():
            return {g: r for g in gpus if (r := self._read_held(g))}

    # -- files ------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        _shared_folder(self.folder)
        fd = _open_shared(self.folder / ".lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _key(self, gpu: int) -> str:
        """The GPU's name in the folder: its UUID where known, else its index."""
        return str(self.uuids.get(int(gpu), int(gpu)))

    def _path(self, gpu: int) -> Path:
        return self.folder / f"gpu-{self._key(gpu)}.json"

    def _live_queue(self) -> list[dict[str, Any]]:
        """The waiting cells whose runners still run (the same process: pid and start time)."""
        queue = _load_json(self.folder / QUEUE_NAME)  # torn or odd: the live runners join again
        if not isinstance(queue, list):
            return []
        return [w for w in queue if _entry_ok(w) and same_process(w["runner_pid"], w["runner_start"])]

    def _write_queue(self, queue: list[dict[str, Any]]) -> None:
        _rewrite(self.folder / QUEUE_NAME, json.dumps(queue, sort_keys=True).encode() if queue else b"")

    def _held_record(self, key: str) -> dict[str, Any] | None:
        """The lease that holds the GPU named ``key`` (UUID or index), None if free.
        A GPU no runner has leased yet has no file, and none is made for it here."""
        path = self.folder / f"gpu-{key}.json"
        if not os.path.lexists(path):
            return None
        record = self._read_file(path)
        return record if record is not None and held(record) else None

    def _read(self, gpu: int) -> dict[str, Any] | None:
        return self._read_file(self._path(gpu))

    def _read_file(self, path: Path) -> dict[str, Any] | None:
        record = _load_json(path)
        return record if isinstance(record, dict) else None  # torn: its runner was killed mid-write

    def _read_held(self, gpu: int) -> dict[str, Any] | None:
        """The lease that holds ``gpu``, under its UUID or, for a card whose UUID
        this runner knows, under its index (a runner that had no UUID for it)."""
        key = self._key(gpu)
        return self._held_record(key) or (self._held_record(str(gpu)) if key != str(gpu) else None)

    def _write(self, gpu: int, record: dict[str, Any] | None) -> None:
        _rewrite(self._path(gpu), b"" if record is None else json.dumps(record, sort_keys=True).encode())


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container)
        return str(os.getuid())


_FIX = "set WATTSWEEP_LEASE_DIR to a folder every local user of wattsweep can write"


def _shared_folder(folder: Path) -> None:
    """The folder, made sticky and writable by all when this process creates it.
    One made by another user must be a real folder with the sticky bit (so no
    user can remove another's files)."""
    try:
        folder.mkdir(parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise LeaseError(f"cannot make the GPU lease folder {folder} ({e.strerror}); {_FIX}") from None
    else:
        os.chmod(folder, 0o1777)
        return
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise LeaseError(f"the GPU lease folder {folder} is not a folder (a link or a file); {_FIX}")
    if st.st_uid not in (0, os.getuid()) and not st.st_mode & stat.S_ISVTX:
        raise LeaseError(f"the GPU lease folder {folder} belongs to another user and is not sticky; {_FIX}")


def _open_shared(path: Path) -> int:
    """Open (creating) a lease file every local user may rewrite: never through a
    link, never a FIFO or device, never a file with a second name elsewhere."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise LeaseError(f"cannot use the GPU lease file {path} ({why}); remove it, or {_FIX}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise LeaseError(f"the GPU lease file {path} is not a plain file of its own (a device, a pipe or a "
                         f"hard link); remove it, or {_FIX}")
    if st.st_uid == os.getuid():
        os.fchmod(fd, 0o666)  # whatever the umask: another user's runner rewrites it later
    return fd


def _load_json(path: Path) -> Any:
    """A shared file's JSON; None when it is empty, torn or not JSON at all
    (anything a parser can raise on what another user wrote)."""
    fd = _open_shared(path)
    try:
        data = _read_all(fd)
    finally:
        os.close(fd)
    try:
        return json.loads(data) if data.strip() else None
    except Exception:  # noqa: BLE001 - RecursionError, UnicodeDecodeError, ValueError...
        return None


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _rewrite(path: Path, data: bytes) -> None:
    """Rewrite a shared file in place: the new bytes first, then the length, so a
    runner killed between the two leaves whole JSON followed by old bytes at
    worst (read as torn: free, or an empty line), never an empty file mid-write."""
    fd = _open_shared(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.pwrite(fd, view, len(data) - len(view)):]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _entry_ok(w: Any) -> bool:
    """A place in line as claim writes it; anything else (another version, a hand
    edit) is passed over rather than let stop every runner."""
    return (isinstance(w, dict) and isinstance(w.get("since_unix_s"), (int, float))
            and isinstance(w.get("runner_pid"), int) and isinstance(w.get("runner_start"), int)
            and isinstance(w.get("n"), int) and w["n"] >= 1 and isinstance(w.get("cell_id"), str)
            and isinstance(w.get("gpus"), list) and all(isinstance(k, str) and _KEY.fullmatch(k) for k in w["gpus"]))
