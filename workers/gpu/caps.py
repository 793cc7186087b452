"""The cap lifecycle: a power limit that always comes back.

Per GPU, on entry: repair a leftover save file (ledger ``repair``) → read the
previous limit → check the card's range and the site policy (reject, never
clamp) → write the save file (fsync) → check the ledgers are writable → set
→ read back the enforced limit → ledger ``apply`` with requested and
enforced values; beyond ``cap_tolerance_w``: ledger ``apply``/``failed``,
restore, raise CapMismatchError. (The apply record follows the set so that
it carries the enforced value; a process killed in between leaves its save
file, whose repair record names the job and cell.) On exit (normal end, exception, SIGTERM, submitit's
SIGUSR2): set the saved previous value back (never the default or the
maximum) → ledger ``restore`` → remove the save file. A main thread blocked
in C++ (a collective waiting on a hung rank) cannot run the handler: the
stop watcher (workers/stop.py) restores from its own thread after a grace
period. A SIGKILL leaves the save file behind for the epilog (``wattsweep
caps restore --all``).

``requested_w=None`` leaves the card alone (no ledger change records); the
current limit is still recorded for the results. Observe mode reads the
card and records ``apply``/``observed`` with what it would set; no setter
is ever called.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from orchestrator.contracts import RunOptions
from workers import stop
from workers.gpu.base import CapMismatchError, GpuBackend, GpuError, GpuInfo, run_or_queue
from workers.gpu.errors import range_error
from workers.gpu.ledger import LedgerWriter, make_record, site_ledger_path
from workers.gpu.policy import load_policy
from workers.gpu.state import SaveFile, make_save, node_dir, owner_alive, read_save, remove_save, resolve_state_dir, write_save

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def stop_on_term() -> None:
    """From the worker's first step, SIGTERM ends it (SignalExit) instead of
    being passed over, as submitit's own handler does: a cancel that arrives
    while the worker starts (before any cap session) used to be ignored, and
    the cell went on to set its caps and run. A cap session replaces this
    handler while it holds caps, and gives it back after."""
    if threading.current_thread() is not threading.main_thread():
        return
    stop.watch()  # a stop that the main thread, blocked in C++, cannot take (workers/stop.py)

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.handled()
        raise SignalExit(signum, caps_held=False)

    handler.outside_caps = True  # type: ignore[attr-defined]  # a cap session does not chain to it
    signal.signal(signal.SIGTERM, stop.announces(handler))


class CapPolicyError(GpuError):
    """The requested cap breaks the site policy."""


class SignalExit(SystemExit):
    """Raised after a signal, once the caps were put back (or failed to be):
    exit status 128 + signal, a message that says which."""

    def __init__(self, signum: int, not_restored: int = 0, *, caps_held: bool = True):
        super().__init__(128 + signum)
        self.signum, self.not_restored, self.caps_held = signum, not_restored, caps_held

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if not self.caps_held:
            return f"stopped by {name} (no power cap was held at the time)"
        if self.not_restored:
            return (f"stopped by {name}; power cap NOT restored on {self.not_restored} GPU(s): the epilog or "
                    f"`wattsweep caps restore --all` will repair from the save files")
        return f"stopped by {name}; power caps were restored to their previous values"


@dataclass(frozen=True)
class CapRecord:
    """What was done to one GPU: recorded in the results and DONE.json."""

    index: int
    uuid: str
    name: str
    previous_w: float
    requested_w: float | None
    enforced_w: float
    observed_only: bool


def restore_from_save(backend: Any, ndir: Path, uuid: str, ledger: LedgerWriter, *, action: str = "repair",
                      cell_id: str | None = None, slurm: dict | None = None,
                      tolerance_w: float = 1.0) -> dict[str, Any] | None:
    """Put the GPU ``uuid`` with a save file back to its saved previous limit;
    ledger the result; remove the save file when the card reads back right.
    Returns the ledger record (None when no save file). Raises the backend's
    error after recording it (the save file then stays for the next repair)."""
    save = read_save(ndir, uuid)
    if save is None:
        return None
    index = _index_of(backend, save)
    rec = dict(index=index, uuid=save.uuid, name=save.name, previous_w=save.previous_w,
               requested_w=save.requested_w, cell_id=cell_id or save.cell_id, backend=backend.name,
               slurm=slurm or {"job_id": save.job_id, "array_task_id": save.array_task_id},
               host=save.host, node=Path(ndir).name)  # the GPU's node, wherever the repair runs
    try:
        if abs(backend.get_power_limit_w(index) - save.previous_w) > tolerance_w:
            backend.set_power_limit_w(index, save.previous_w)
        enforced = backend.get_power_limit_w(index)
        if abs(enforced - save.previous_w) > tolerance_w:
            raise CapMismatchError(f"GPU {index} reads {enforced:g} W after restoring {save.previous_w:g} W; "
                                   f"run `wattsweep caps restore --all` again or reset the limit by hand")
    except GpuError as exc:
        ledger.append(make_record(action=action, result="failed", enforced_w=None, error=str(exc), **rec), strict=False)
        raise
    out = make_record(action=action, result="ok", enforced_w=enforced, **rec)
    ledger.append(out, strict=False)  # the card is back even if a ledger is unwritable
    remove_save(ndir, uuid)
    return out


def _index_of(backend: Any, save: SaveFile) -> int:
    """This process's index of the saved card (see state.py: indices differ
    between a job and the epilog)."""
    for d in backend.devices():
        if d.uuid == save.uuid:
            return d.index
    raise GpuError(f"GPU {save.uuid} (index {save.index} for the job that capped it) is not visible here; "
                   f"restore it where it is visible: `wattsweep caps restore --all` on its node, outside the job")


class CapSession:
    """Context manager: caps ``gpu_indices`` on enter, restores them on exit.

    ``__enter__`` returns one CapRecord per GPU. Signal handlers for SIGTERM
    and SIGUSR2 are installed (main thread only) for the session's lifetime:
    they restore, then chain to the previous handler (submitit's requeue on
    USR2) and exit with 128 + signal if that handler returns.
    """

    def __init__(self, backend: GpuBackend, gpu_indices: list[int], requested_w: float | None, *, cell_id: str,
                 options: RunOptions, ledger_paths: list[Path], slurm: dict | None = None):
        self.backend = backend
        self.indices = list(gpu_indices)
        self.requested_w = None if requested_w is None else float(requested_w)
        self.cell_id = cell_id
        self.options = options
        self.slurm = dict(slurm or {})
        self.observe = bool(options.gpu_observe or getattr(backend, "observe_only", False))
        self.helper = bool(getattr(backend, "helper_managed", False))  # capctl keeps save files and site ledger itself
        self.ndir = node_dir(resolve_state_dir(options.state_dir))
        self.ledger = LedgerWriter(self._ledger_paths(ledger_paths))
        self.records: list[CapRecord] = []
        self._pending: list[GpuInfo] = []  # GPUs whose limit may differ from their save file
        self._previous: dict[int, float] = {}  # capctl: the value to set back (the helper holds the save file)
        self._lock = threading.RLock()
        self._old_handlers: dict[int, Any] = {}
        self._restoring = False  # a restore is under way (a signal then waits for it)
        self._deferred: int | None = None  # a signal that arrived during it
        self._stop_token: int | None = None  # this session's action in the stop watcher
        self._in_flight = 0  # GPUs being restored now (by the main thread or the stop watcher)
        if hasattr(backend, "set_context"):  # capctl: the helper's records name the cell, job and ledgers
            backend.set_context(cell_id=cell_id, slurm=self.slurm, ledgers=tuple(map(str, self.ledger.paths)))

    def _ledger_paths(self, given: list[Path]) -> list[Path]:
        site = site_ledger_path(self.options.site_ledger)
        paths = [Path(p) for p in given]
        if site is not None and site not in paths:
            paths.append(site)
        if self.helper and site is not None:
            paths = [p for p in paths if p != site]  # the privileged helper writes the site ledger
        return paths

    # -- context manager --------------------------------------------------
    def __enter__(self) -> list[CapRecord]:
        self._install_handlers()
        try:
            infos = {d.index: d for d in self.backend.devices()}
            for index in self.indices:
                if index not in infos:
                    raise GpuError(f"GPU {index} is not visible to this process (visible: {sorted(infos)}); "
                                   f"check CUDA_VISIBLE_DEVICES and the job's GPU request")
                self.records.append(self._apply(infos[index]))
        except BaseException:
            self.restore(raise_errors=False)
            self._remove_handlers()
            raise
        return list(self.records)

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.restore(raise_errors=exc_type is None)
        finally:
            self._remove_handlers()

    # -- apply ------------------------------------------------------------
    def _rec(self, info: GpuInfo, previous: float | None) -> dict[str, Any]:
        return dict(index=info.index, uuid=info.uuid, name=info.name, previous_w=previous, requested_w=self.requested_w,
                    cell_id=self.cell_id, slurm=self.slurm, backend=self.backend.name)

    def _apply(self, info: GpuInfo) -> CapRecord:
        self._repair_leftover(info)
        previous = self.backend.get_power_limit_w(info.index)
        req = self.requested_w
        if req is None:  # leave the card alone; record its limit for the results
            return CapRecord(info.index, info.uuid, info.name, previous, None, previous, self.observe)
        self._check(info, req)
        if self.observe:
            self.ledger.append(make_record(action="apply", result="observed", enforced_w=previous, **self._rec(info, previous)))
            getattr(self.backend, "would_set", {})[info.index] = req
            return CapRecord(info.index, info.uuid, info.name, previous, req, previous, True)
        if not self.helper:
            save = make_save(info.index, info.uuid, info.name, previous, req, backend=self.backend.name,
                             gpu_profile=self.options.gpu_profile if self.backend.name == "simulated" else None,
                             cell_id=self.cell_id, slurm=self.slurm, ledgers=tuple(map(str, self.ledger.paths)))
            write_save(self.ndir, save)
        with self._lock:
            self._previous[info.index] = previous
            self._pending.append(info)
        self.ledger.check_writable()  # no change to a card without a ledger to record it
        try:
            self.backend.set_power_limit_w(info.index, req)
            enforced = self.backend.get_power_limit_w(info.index)
        except GpuError as exc:
            self.ledger.append(make_record(action="apply", result="failed", enforced_w=None, error=str(exc),
                                           **self._rec(info, previous)), strict=False)
            raise
        if abs(enforced - req) > self.options.cap_tolerance_w:
            err = (f"GPU {info.index} enforces {enforced:g} W after a request of {req:g} W (tolerance "
                   f"{self.options.cap_tolerance_w:g} W); the cell is not measured under the wrong cap and the "
                   f"previous {previous:g} W is restored")
            self.ledger.append(make_record(action="apply", result="failed", enforced_w=enforced, error=err,
                                           **self._rec(info, previous)), strict=False)
            raise CapMismatchError(err)
        self.ledger.append(make_record(action="apply", result="ok", enforced_w=enforced, **self._rec(info, previous)))
        return CapRecord(info.index, info.uuid, info.name, previous, req, enforced, False)

    def _check(self, info: GpuInfo, req: float) -> None:
        """Card range and site policy, again at apply time: reject, never clamp."""
        if not info.min_limit_w <= req <= info.max_limit_w:
            raise range_error(info.index, req, info.min_limit_w, info.max_limit_w)
        if self.options.policy_path:
            reason = load_policy(self.options.policy_path).check(
                gpu_name=info.name, partition=self.slurm.get("partition"), power_cap_w=req,
                user=self.slurm.get("user"), account=self.slurm.get("account"))
            if reason:
                raise CapPolicyError(f"cap of {req:g} W on GPU {info.index} rejected: {reason}")

    def _repair_leftover(self, info: GpuInfo) -> None:
        """A save file from a killed job: put its previous value back first, so
        this session saves the card's real previous limit, not a leftover cap."""
        if self.observe:
            return
        if self.helper:
            self.backend.repair(info.index)
            return
        save = read_save(self.ndir, info.uuid)
        if save is None:
            return
        if save.pid != os.getpid() and owner_alive(save):
            # Another session on this node holds the card: two cells were
            # given one GPU. Repairing would pull its cap mid-measurement.
            raise GpuError(f"GPU {info.index} ({info.uuid}) is capped by a running process: pid {save.pid} "
                           f"({save.user}, job {save.job_id}, cell {save.cell_id}); two cells must not share a GPU: "
                           f"check the job's GPU request and CUDA_VISIBLE_DEVICES")
        from workers.gpu.repair import cell_ledgers

        # The killed session's ledgers hear of the repair too: their audit
        # would otherwise show the card as left capped.
        ledger = LedgerWriter([*self.ledger.paths, *cell_ledgers(save)])  # LedgerWriter drops repeated paths
        restore_from_save(self.backend, self.ndir, info.uuid, ledger, action="repair", cell_id=None,
                          tolerance_w=self.options.cap_tolerance_w)

    # -- restore ----------------------------------------------------------
    def restore(self, *, raise_errors: bool = True) -> int:
        """Restore every GPU this session touched; idempotent, tries every GPU
        before raising (errors also go to stderr and the ledger; the save
        files stay for the epilog). Returns how many could not be restored."""
        errors: list[str] = []
        # A TERM/USR2 arriving now is noted by the handler and acted on after
        # the loop: acted on at once, it would end the process between the
        # restore's steps and leave the card capped with no ledger record.
        self._restoring = True
        try:
            errors = self._restore_pending()
        finally:
            self._restoring = False
            deferred, self._deferred = self._deferred, None
            if deferred is not None:
                self._end_by_signal(deferred, None, len(errors))
        if errors and raise_errors:
            raise GpuError(f"power limit not restored on {len(errors)} GPU(s): {errors[0]}")
        return len(errors)

    def _restore_pending(self, wait_others_s: float = 30.0) -> list[str]:
        """Restore what is still capped, one GPU at a time, each by whichever
        thread takes it first (the main thread's handler, the stop watcher);
        then wait, up to ``wait_others_s``, for GPUs the other thread is still
        restoring: the process must not end under it. The errors, also on
        stderr and in the ledger."""
        errors = []
        while True:
            with self._lock:
                if not self._pending:
                    break
                info = self._pending.pop(0)
                self._in_flight += 1
            try:
                self._restore_one(info)
            except GpuError as exc:
                errors.append(str(exc))
                print(f"wattsweep: cap NOT restored on GPU {info.index}: {exc}; the epilog or "
                      f"`wattsweep caps restore --all` will repair it", file=sys.stderr)
            finally:
                with self._lock:
                    self._in_flight -= 1
        deadline = time.monotonic() + wait_others_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        return errors

    def _restore_when_stuck(self, signum: int, notes: list) -> None:
        """The watcher thread's restore (workers/stop.py): the main thread is
        blocked and will not run the signal handler. A GPU the main thread is
        restoring (it got out of a long call just now) is left to it, and
        waited for briefly: the process ends when this returns, and Slurm's
        KillWait (30 s by default) has already partly run."""
        with self._lock:
            held = bool(self._pending) or self._in_flight > 0
        errors = self._restore_pending(wait_others_s=10.0)
        if self._in_flight:  # the main thread is stuck inside a restore (a hung driver call)
            errors.append(f"{self._in_flight} GPU(s) still being restored by the blocked main thread")
        if not held:
            notes.append("no power cap was held by this rank (observe mode, or no cap asked)")
        elif errors:
            notes.append(f"power cap NOT restored on {len(errors)} GPU(s): the epilog or "
                         f"`wattsweep caps restore --all` will repair from the save files")
        else:
            notes.append("power caps were restored to their previous values (by the watcher thread)")

    def _restore_one(self, info: GpuInfo) -> None:
        tol = self.options.cap_tolerance_w
        if not self.helper:
            restore_from_save(self.backend, self.ndir, info.uuid, self.ledger, action="restore",
                              cell_id=self.cell_id, slurm=self.slurm, tolerance_w=tol)
            return
        previous = self._previous[info.index]
        rec = self._rec(info, previous)
        try:
            self.backend.set_power_limit_w(info.index, previous)  # the helper sees its saved value: a restore
            enforced = self.backend.get_power_limit_w(info.index)
        except GpuError as exc:
            self.ledger.append(make_record(action="restore", result="failed", enforced_w=None, error=str(exc), **rec),
                               strict=False)
            raise
        self.ledger.append(make_record(action="restore", result="ok", enforced_w=enforced, **rec), strict=False)

    # -- signals ----------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the epilog covers this case
        for sig in HANDLED_SIGNALS:
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN:
                continue
            self._old_handlers[sig] = old
            signal.signal(sig, self._on_signal)
        stop.watch()
        self._stop_token = stop.push_action(self._restore_when_stuck)

    def _remove_handlers(self) -> None:
        stop.pop_action(self._stop_token)
        self._stop_token = None
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        stop.handled()
        if run_or_queue(lambda: self._on_signal(signum, None)):
            return  # inside a backend's locked update: restore once it has let go
        if self._restoring:
            self._deferred = signum  # the restore under way finishes first, then ends the process
            return
        failed = self.restore(raise_errors=False)  # failures: stderr and ledger; the save file stays for the epilog
        self._end_by_signal(signum, frame, failed)

    def _end_by_signal(self, signum: int, frame: FrameType | None, failed: int) -> None:
        old: Callable[..., Any] | int | None = self._old_handlers.get(signum)
        self._remove_handlers()
        if callable(old) and not getattr(old, "outside_caps", False):
            old(signum, frame)  # submitit's USR2 handler checkpoints and requeues, then exits
        # Whatever the previous handler did, the cap is gone: never keep measuring.
        raise SignalExit(signum, failed)


stop.announces(CapSession._on_signal)  # it calls stop.handled() first
