"""The local launcher: cells run on this machine through submitit's local executor.

``submit`` returns at once. It pickles each cell's ``CellTask`` into the cell's
``launch/`` folder, writes a queue file and starts a detached runner process
(``python -m orchestrator.submit.local QUEUE``, its own session, so it outlives
the command and a closed terminal). The runner starts the cells in order,
``max_parallel`` at a time; each cell is one submitit local job with one task
per shard (``tasks_per_node=shards``), whose ranks find each other through
submitit's job environment. On a machine with NVIDIA GPUs each job gets
``shards`` GPUs of its own, leased machine-wide (``gpu_leases``), so runners of
other sweeps and other users wait for them; ``WATTSWEEP_LOCAL_GPUS=0,2`` limits
the launcher to those GPUs.

The queue file (``SWEEP_DIR/local/queue-<n>.json``) is the local launcher's
"queue": per cell its state (pending, running, ended), submitit job id and exit.
``local_queue_states`` reads it for ``status``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from orchestrator.contracts import GPU_PROFILES, SweepPaths, atomic_write_json, read_json, write_failed
from orchestrator.plan.planned import PlannedCell
from orchestrator.submit.gang import GangWatch
from orchestrator.submit.gpu_leases import GpuLeases, LeaseError, controller_alive
from orchestrator.submit.gpu_leases import pid_alive as _pid_alive
from orchestrator.submit.base import (
    LaunchError,
    SubmissionRecord,
    append_submissions,
    make_task,
    next_attempt,
    prepare_cell_dir,
)

POLL_S = 0.2
# After a cancel's SIGTERM, how long a cell may take to restore its caps and
# exit before it is killed (Slurm's KillWait default is the same).
KILL_WAIT_S = 30.0


def queue_dir(paths: SweepPaths) -> Path:
    return paths.root / "local"


class LocalLauncher:
    name = "local"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.max_parallel = int(cfg.get("max_parallel", 1))
        self.timeout_min = float(cfg.get("timeout_min", 720.0))
        self._runners: dict[int, subprocess.Popen[bytes]] = {}

    # -- submit ------------------------------------------------------------
    def submit(self, paths: SweepPaths, cells: list[PlannedCell], *, dry_run: bool = False) -> list[SubmissionRecord]:
        todo = [c for c in cells if c.feasible]
        if dry_run:
            _check_gpus(todo, leases=False)  # what the real submission would refuse, refused here too
            for c in todo:
                print(f"would run cell {c.cell_id} here as {c.params.shards} local process(es)")
            print(f"{len(todo)} cell(s), {self.max_parallel} at a time, in a background runner")
            return []
        if not todo:
            return []
        _check_gpus(todo)  # said here, not later in the runner's log
        entries = [self._stage(paths, c) for c in todo]
        qdir = queue_dir(paths)
        qdir.mkdir(parents=True, exist_ok=True)
        queue_path = qdir / f"queue-{time.time_ns()}.json"
        atomic_write_json(queue_path, {
            "sweep_dir": str(paths.root.resolve()),
            "max_parallel": self.max_parallel,
            "timeout_min": self.timeout_min,
            "runner_pid": None,
            "cells": entries,
        })
        proc = self._start_runner(queue_path)
        record = SubmissionRecord(
            cell_ids=tuple(e["cell_id"] for e in entries),
            launcher=self.name,
            job_ids=tuple(f"{proc.pid}_{i}" for i in range(len(entries))),
            array=False,
            submitted_unix_s=time.time(),
            attempt=max(e["attempt"] for e in entries),
            extra={"runner_pid": proc.pid, "queue": str(queue_path)},
        )
        append_submissions(paths, [record])
        return [record]

    def _stage(self, paths: SweepPaths, cell: PlannedCell) -> dict[str, Any]:
        import cloudpickle  # submitit's own pickler: tasks defined anywhere travel

        prepare_cell_dir(paths, cell.cell_id)
        attempt = next_attempt(paths, cell.cell_id)
        task = make_task(paths, cell, attempt)
        task_path = paths.launch_dir(cell.cell_id) / "task.pkl"
        with open(task_path, "wb") as f:
            cloudpickle.dump(task, f)
        return {"cell_id": cell.cell_id, "shards": cell.params.shards, "attempt": attempt,
                "power_cap_w": cell.params.power_cap_w,
                "task": str(task_path), "state": "pending", "job_id": None, "exit": None}

    def _start_runner(self, queue_path: Path) -> subprocess.Popen[bytes]:
        log = open(queue_path.with_suffix(".log"), "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.submit.local", str(queue_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the command's exit and Ctrl-C
                cwd=os.getcwd(),
            )
        except OSError as e:
            raise LaunchError(f"could not start the local runner for {queue_path}: {e}") from None
        finally:
            log.close()
        self._runners[proc.pid] = proc
        return proc

    # -- wait --------------------------------------------------------------
    def wait(self, paths: SweepPaths, records: list[SubmissionRecord]) -> None:
        for rec in records:
            pid = int((rec.extra or {}).get("runner_pid", 0))
            if pid in self._runners:
                self._runners.pop(pid).wait()
                continue
            queue = Path((rec.extra or {}).get("queue", ""))
            while queue.is_file() and not _queue_finished(queue, pid):
                time.sleep(POLL_S)


def stop_controller(job_id: Any, sig: int = signal.SIGTERM) -> bool:
    """Signal a cell's submitit controller, which passes the signal to every
    task (SIGTERM: the workers restore their caps and write FAILED.json)."""
    if not controller_alive(job_id):
        return False
    try:
        os.kill(int(job_id), sig)
    except OSError:
        return False
    return True


def earlier_still_running(queue: Path) -> list[str]:
    """What of this sweep's earlier local queues still runs: their runners, or
    cells a dead runner left running. A new runner waits for them: two runners
    would put cells on the same GPUs (and a cell that restores a cap while
    another starts on its card fails that one)."""
    mine = _queue_ns(queue)
    busy = []
    for other in queue.parent.glob("queue-*.json"):
        if _queue_ns(other) >= mine:
            continue
        try:
            q = read_json(other)
        except (OSError, ValueError):
            continue
        if _pid_alive(q.get("runner_pid")) and not all(e["state"] == "ended" for e in q["cells"]):
            busy.append(f"runner pid {q['runner_pid']} ({other.name})")
        else:
            busy += [f"cell {e['cell_id']} (controller pid {e['job_id']})" for e in q["cells"]
                     if e["state"] == "running" and controller_alive(e.get("job_id"))]
    return busy


def _queue_ns(queue: Path) -> int:
    try:
        return int(queue.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _queue_finished(queue: Path, runner_pid: int | None = None) -> bool:
    q = read_json(queue)
    if all(e["state"] == "ended" for e in q["cells"]):
        return True
    pid = q.get("runner_pid") or runner_pid
    return pid is not None and not _pid_alive(pid)


def local_queue_states(paths: SweepPaths) -> dict[str, dict[str, Any]]:
    """cell id -> its latest local queue entry, with "state" one of pending,
    running, ended, lost (the runner died before the cell ended)."""
    out: dict[str, dict[str, Any]] = {}
    qdir = queue_dir(paths)
    if not qdir.is_dir():
        return out
    for queue in sorted(qdir.glob("queue-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            q = read_json(queue)
        except (OSError, ValueError):
            continue
        runner_alive = _pid_alive(q.get("runner_pid"))
        for e in q["cells"]:
            entry = dict(e, queue=str(queue))
            if e["state"] != "ended" and q.get("runner_pid") is not None and not runner_alive:
                # The runner died (kill -9, a reboot of the login shell's session);
                # a cell it had started may still run on its own: keep it running.
                orphan = e["state"] == "running" and controller_alive(e.get("job_id"))
                entry["state"] = "running" if orphan else "lost"
                entry["orphan"] = orphan
            out[e["cell_id"]] = entry
    return out


# ---------------------------------------------------------------------------
# The runner (a detached process)
# ---------------------------------------------------------------------------


def _gpu_uuids() -> list[str]:
    """The UUIDs of this machine's NVIDIA GPUs in index order ([] without a
    driver; "" for a card whose UUID cannot be read); never imports torch."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(int(pynvml.nvmlDeviceGetCount())):
                try:
                    uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                except pynvml.NVMLError:  # this card only (lost, no permission): named by index
                    uuid = ""
                out.append(uuid.decode() if isinstance(uuid, bytes) else str(uuid))
            return out
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no card
        return []


def _indices_of(devices: list[str], uuids: list[str]) -> list[int]:
    """GPU indices for a CUDA_VISIBLE_DEVICES list: indices as they are, UUIDs
    (or the unique prefixes CUDA accepts) through NVML. A MIG instance or a
    name that matches no GPU, or more than one, cannot be leased as a whole
    card: refused by name."""
    out = set()
    for name in devices:
        if name.isdigit():
            out.add(int(name))
            continue
        hits = [i for i, u in enumerate(uuids) if u == name or (name.startswith("GPU-") and u.startswith(name))]
        if len(hits) != 1:
            what = "a MIG instance" if name.startswith("MIG-") else ("no GPU here" if not hits else "several GPUs")
            raise ValueError(f"CUDA_VISIBLE_DEVICES names {name!r}, {what}: the local launcher leases whole GPUs by "
                             f"index; set WATTSWEEP_LOCAL_GPUS=0,1,... to the cards it may use, or use launcher=slurm")
        out.add(hits[0])
    return sorted(out)


def _check_gpus(cells: list[PlannedCell], *, leases: bool = True) -> None:
    """What would stop the runner, refused at submission: a bad GPU list, a
    cell wider than it, a lease folder that cannot be used (``leases``: a dry
    run checks the list and the widths only, and writes nothing)."""
    try:
        gpus = local_gpus()
    except ValueError as e:
        raise LaunchError(str(e)) from None
    wide = [c.cell_id for c in cells if c.params.shards > len(gpus)]
    if wide:
        raise LaunchError(f"cell(s) {', '.join(wide)} need more GPUs than the local launcher has: "
                          f"{_gpu_count_text(gpus)}; use launcher=slurm or fewer shards")
    if not leases:
        return
    try:
        _leases().check(gpus)
    except LeaseError as e:
        raise LaunchError(str(e)) from None


def _leases() -> GpuLeases:
    """This machine's lease folder, files named by each card's UUID; the GPUs stay
    NVML's indices (the worker makes CUDA number them as NVML does: entry.run_cell)."""
    return GpuLeases(uuids=dict(enumerate(_gpu_uuids())))


def _gpu_count_text(gpus: list[int]) -> str:
    """How many GPUs the launcher has, and whether WATTSWEEP_LOCAL_GPUS said so."""
    if os.environ.get("WATTSWEEP_LOCAL_GPUS", "").strip():
        return f"{len(gpus)} (WATTSWEEP_LOCAL_GPUS)"
    return f"{len(gpus)} simulated (no NVIDIA GPU here)" if not _gpu_uuids() else str(len(gpus))


def local_gpus() -> list[int]:
    """The GPUs the local launcher may use: ``WATTSWEEP_LOCAL_GPUS`` (indices,
    comma-separated) when set; else, on a machine with GPUs, those an inherited
    ``CUDA_VISIBLE_DEVICES`` lists, by index or UUID (an interactive allocation,
    `salloc`, shows only its own: the launcher must not hand out the others);
    else every GPU. On a machine without one, the simulated node's cards
    (SIMULATED_GPUS): the simulated backend keeps one state per card for every
    process of the machine, so two cells on one simulated card would each book
    the other's power and one's cap would fail on the other's; leased like real
    cards (files named by index), cells of any sweep take turns on them."""
    text = os.environ.get("WATTSWEEP_LOCAL_GPUS", "").strip()
    if not text:
        uuids = _gpu_uuids()
        inherited = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
        if uuids and inherited:
            return _indices_of(inherited, uuids)
        return list(range(len(uuids) or SIMULATED_GPUS))
    parts = [x.strip() for x in text.split(",")]
    try:
        gpus = [int(x) for x in parts]
    except ValueError:
        raise ValueError(f"WATTSWEEP_LOCAL_GPUS={text!r}; expected GPU indices such as 0,1") from None
    if any(g < 0 for g in gpus):
        raise ValueError(f"WATTSWEEP_LOCAL_GPUS={text!r}; GPU indices start at 0")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"WATTSWEEP_LOCAL_GPUS={text!r} names a GPU twice")
    return sorted(gpus)


# The cards of a simulated node (workers/gpu/simulated.py): every card profile has this many.
SIMULATED_GPUS = min(p.gpus_per_node for p in GPU_PROFILES.values())


def cpu_memory_bytes() -> int | None:
    """None on a machine with an NVIDIA GPU; on one without, the memory its CPU cells may
    fill (the kernel's MemAvailable): the local launcher then runs each cell's model on
    the CPU, its telemetry simulated, so the weights and KV cache must fit in host memory."""
    if _gpu_uuids():
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # no /proc (not Linux): physical memory, an upper bound
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# The submitit controller's own output (a cancel shows there as its KeyboardInterrupt).
CONTROLLER_LOG = "controller.log"


@contextmanager
def _controller_output(path: Path) -> Iterator[None]:
    """The submitit controller inherits the runner's stdout and stderr (the
    runner's log, shared by every cell): while it starts, point them at the
    cell's own file, so a cancelled cell's traceback lands beside its logs."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        yield  # the runner's log, as before
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


class _Runner:
    def __init__(self, queue_path: Path) -> None:
        self.queue_path = queue_path
        self.q = read_json(queue_path)
        self.paths = SweepPaths.of(self.q["sweep_dir"])
        self.gpus = local_gpus()
        self.leases = _leases()
        self.running: list[tuple[dict[str, Any], Any, list[int]]] = []
        self._told_held: tuple[Any, ...] = ()
        self._queued = False  # this runner's next cell waits in the machine-wide line
        self._gangs: dict[str, GangWatch] = {}
        self._cancels_seen: tuple[int, int] | None = None  # (mtime_ns, size) of cancellations.jsonl

    def save(self) -> None:
        atomic_write_json(self.queue_path, self.q)

    def run(self) -> None:
        self.q["runner_pid"] = os.getpid()
        self.save()
        try:
            self._run()
        except Exception as e:  # the runner cannot go on: say so where status looks
            why = f"the local runner stopped: {type(e).__name__}: {e}"
            for entry in self.q["cells"]:
                if entry["state"] == "pending":
                    self._fail(entry, why, traceback.format_exc())
            raise

    def _run(self) -> None:
        pending = [e for e in self.q["cells"] if e["state"] == "pending"]
        told = False
        while pending and (busy := earlier_still_running(self.queue_path)):
            if not told:
                print(f"waiting for this sweep's earlier local work to end: {', '.join(busy)}", flush=True)
                told = True
            self._apply_cancels(pending)
            time.sleep(1.0)
        while pending or self.running:
            self._apply_cancels(pending)
            self._escalate()
            self._watch_gangs()
            while pending and len(self.running) < self.q["max_parallel"]:
                gpus = self._claim(pending[0])
                if gpus is None:
                    break
                self._start(pending.pop(0), gpus)
            self._leave_line_if_idle(pending)
            self._reap()
            time.sleep(POLL_S)

    def _leave_line_if_idle(self, pending: list[dict[str, Any]]) -> None:
        """No cell left to start (the waiting one was cancelled): give up this
        runner's place in the machine-wide line, which held GPUs back from others."""
        if not pending and self._queued:
            self.leases.withdraw()
            self._queued = False

    def _apply_cancels(self, pending: list[dict[str, Any]]) -> None:
        for entry in self._newly_cancelled():
            if entry in pending:
                pending.remove(entry)
                entry.update(state="ended", exit=None, cancelled=True, ended_unix_s=time.time())
                self.save()
            else:
                self._stop(entry)

    def _escalate(self) -> None:
        """A cancelled cell still running KILL_WAIT_S after its SIGTERM (a worker
        stuck in a system call, stopped, ignoring signals) is ended as Slurm
        does after KillWait: submitit's own cancel interrupts its tasks, then
        kills them; the runner's FAILED.json then says where caps may remain."""
        now = time.time()
        for entry, job, _ in self.running:
            sent = entry.get("cancel_sent_unix_s")
            if sent is not None and not entry.get("killed") and now - sent > KILL_WAIT_S:
                entry["killed"] = True
                self.save()
                job.cancel(check=False)

    def _watch_gangs(self) -> None:
        """A rank that ended while its cell's other ranks run on (killed before
        they joined, say): after the gang's grace, FAILED.json names it, unless a
        rank wrote one, and the others are stopped as a cancel stops them."""
        for entry, job, _ in self.running:
            if entry["shards"] < 2 or entry.get("cancel_sent_unix_s") is not None:
                continue
            watch = self._gangs.setdefault(entry["cell_id"], GangWatch(int(job.job_id), entry["shards"]))
            gone = watch.look()
            if gone is None:
                continue
            ranks = ", ".join(map(str, gone))
            if not self.paths.failed_marker(entry["cell_id"]).exists():
                write_failed(self.paths, entry["cell_id"],
                             f"rank {ranks} ended (killed? its log says how far it got) while the other ranks "
                             f"ran on; the local runner stopped them after {watch.grace_s:.0f} s",
                             "", {"launcher": "local", "job_id": entry["job_id"], "rank": gone[0],
                                  "attempt": entry.get("attempt")})
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} cell {entry['cell_id']}: rank {ranks} ended while the "
                  "others ran on; stopping them", flush=True)
            entry.update(gang_stopped=True, cancel_sent_unix_s=time.time())  # _escalate kills after KILL_WAIT_S
            self.save()
            stop_controller(job.job_id)

    def _newly_cancelled(self) -> list[dict[str, Any]]:
        """Entries of this queue that `wattsweep cancel` listed since the last
        look (a stat per poll; the file is read only when it changed)."""
        from orchestrator.submit.cancellations import cancellations_path, read_cancellations

        try:
            st = os.stat(cancellations_path(self.paths))
        except OSError:
            return []
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._cancels_seen:
            return []
        self._cancels_seen = seen
        cancels = read_cancellations(self.paths)
        me = os.getpid()
        return [e for i, e in enumerate(self.q["cells"])
                if e["state"] != "ended" and not e.get("cancelled")
                and cancels.get(e["cell_id"]) is not None and cancels[e["cell_id"]].job_id == f"{me}_{i}"]

    def _stop(self, entry: dict[str, Any]) -> None:
        """SIGTERM to a running cell's submitit controller, which forwards it to
        every task: the workers restore their caps and write FAILED.json."""
        entry.update(cancelled=True, cancel_sent_unix_s=time.time())
        self.save()
        for e, job, _ in self.running:
            if e is not entry:
                continue
            # submitit keeps the controller's Popen private; without it, its
            # public cancel (SIGINT, which the workers also turn into a restore).
            process = getattr(job, "_process", None)
            if process is None:
                job.cancel(check=False)
            elif process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def _claim(self, entry: dict[str, Any]) -> list[int] | None:
        """The GPUs the cell may start on, leased to it; [] on a machine without
        GPUs (or for a cell too wide for this one, which _start fails); None
        while other cells, of any sweep, hold too many of them."""
        if not self.gpus or entry["shards"] > len(self.gpus):
            return []
        gpus = self.leases.claim(self.gpus, entry["shards"], sweep=str(self.paths.root), cell_id=entry["cell_id"])
        self._queued = gpus is None
        if gpus is None:
            self._say_who_holds(entry)
        return gpus

    def _say_who_holds(self, entry: dict[str, Any]) -> None:
        """Once per change of holders: which other cells keep this one waiting."""
        mine = {g for _, _, gs in self.running for g in gs}
        others = {g: r for g, r in self.leases.holders(self.gpus).items() if g not in mine}
        ahead = self.leases.queued_ahead
        key = (tuple((g, r.get("cell_id"), r.get("sweep")) for g, r in sorted(others.items())),
               ahead and (ahead.get("cell_id"), ahead.get("sweep")))
        if not (others or ahead) or key == self._told_held:
            return
        self._told_held = key
        held_by = "; ".join(f"GPU {g}: {r.get('user')}'s cell {r.get('cell_id')} of {r.get('sweep')}"
                            for g, r in sorted(others.items()))
        entry["waiting_for"] = f"waits for {entry['shards']} free GPU(s); held: {held_by or 'none'}"
        if ahead:
            entry["waiting_for"] += (f"; ahead in line: {ahead.get('user')}'s cell {ahead.get('cell_id')} of "
                                     f"{ahead.get('sweep')}, waiting for {ahead.get('n')} GPU(s)")
        self.save()  # status shows it
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} cell {entry['cell_id']} of {self.paths.root} "
              f"{entry['waiting_for']}", flush=True)

    def _start(self, entry: dict[str, Any], gpus: list[int]) -> None:
        import cloudpickle
        import submitit

        cell_id, shards = entry["cell_id"], entry["shards"]
        if self.gpus and shards > len(self.gpus):
            self._fail(entry, f"cell needs {shards} GPUs; the local launcher has {_gpu_count_text(self.gpus)}; "
                              "use launcher=slurm or fewer shards")
            return
        try:
            with open(entry["task"], "rb") as f:
                task = cloudpickle.load(f)
            executor = submitit.LocalExecutor(folder=self.paths.launch_dir(cell_id))
            params: dict[str, Any] = {"tasks_per_node": shards, "nodes": 1, "timeout_min": self.q["timeout_min"]}
            if gpus:
                params.update(gpus_per_node=len(gpus), visible_gpus=gpus)
            executor.update_parameters(**params)
            with _controller_output(self.paths.launch_dir(cell_id) / CONTROLLER_LOG):
                job = executor.submit(task)
        except Exception as e:  # a broken task must not stop the other cells
            self.leases.release(gpus)
            self._fail(entry, f"could not start: {e}", traceback.format_exc())
            return
        if gpus:
            self.leases.bind(gpus, int(job.job_id))
        entry.pop("waiting_for", None)
        entry.update(state="running", job_id=job.job_id, started_unix_s=time.time())
        self.save()
        self.running.append((entry, job, gpus))

    def _reap(self) -> None:
        for item in list(self.running):
            entry, job, gpus = item
            if not job.done():
                continue
            self.running.remove(item)
            self.leases.release(gpus)
            code = job._process.poll() if getattr(job, "_process", None) is not None else None
            entry.update(state="ended", exit=code, ended_unix_s=time.time())
            self._mark_if_silent(entry, job)
            self.save()

    def _mark_if_silent(self, entry: dict[str, Any], job: Any) -> None:
        """A worker normally writes DONE.json or FAILED.json itself; if it died
        without either (killed, crashed interpreter), say so in FAILED.json."""
        cid = entry["cell_id"]
        if self.paths.done_marker(cid).exists() or self.paths.failed_marker(cid).exists():
            return
        try:
            job.result()
            detail = "the job ended without writing DONE.json or FAILED.json"
        except Exception as e:  # submitit re-raises the task's error with its traceback
            detail = str(e)
        error = f"local job {entry['job_id']} ended (exit {entry['exit']}) without a marker"
        if entry.get("cancelled"):
            error = f"local job {entry['job_id']} was cancelled (wattsweep cancel) and ended (exit {entry['exit']})"
        if entry.get("power_cap_w") is not None:
            # A worker killed outright never ran its restore.
            error += ("; its GPUs may still be capped: `wattsweep caps show` lists them, "
                      "`wattsweep caps restore --all` puts them back")
        write_failed(self.paths, cid, error, detail, {"launcher": "local", "job_id": entry["job_id"]})

    def _fail(self, entry: dict[str, Any], error: str, tb: str = "") -> None:
        write_failed(self.paths, entry["cell_id"], error, tb, {"launcher": "local"})
        entry.update(state="ended", exit=None, ended_unix_s=time.time())
        self.save()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m orchestrator.submit.local QUEUE_FILE", file=sys.stderr)
        return 2
    _Runner(Path(argv[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
