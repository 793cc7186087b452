"""The launcher interface shared by the local and Slurm launchers.

A launcher turns planned cells into running jobs and records each submission as
one JSON line in ``SWEEP_DIR/submissions.jsonl``. It must return as soon as the
cells are queued; ``wait`` blocks until they have ended (``--wait``).

Launchers are looked up by name (``get_launcher``); each lives in its own module
imported only when chosen, so the login node loads submitit's Slurm side only
for Slurm sweeps.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, runtime_checkable

from orchestrator.contracts import CellTask, SweepPaths
from orchestrator.plan.planned import PlannedCell
from orchestrator.submit.shell import quoted


class LaunchError(RuntimeError):
    """A submission failed; the message names the cells concerned. ``records``:
    what was queued before the failure (already in submissions.jsonl)."""

    def __init__(self, message: str, records: "list[SubmissionRecord] | None" = None) -> None:
        super().__init__(message)
        self.records = list(records or [])


@dataclass(frozen=True)
class SubmissionRecord:
    """One submission: which cells went into which jobs."""

    cell_ids: tuple[str, ...]
    launcher: str  # "local" | "slurm"
    job_ids: tuple[str, ...]  # one per cell (array task ids "123_4" for Slurm arrays)
    array: bool = False
    submitted_unix_s: float = 0.0
    attempt: int = 0  # the CellTask attempt number the cells were submitted with
    extra: Mapping[str, Any] | None = None  # launcher-specific facts (runner pid, array job id, ...)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cell_ids"] = list(self.cell_ids)
        d["job_ids"] = list(self.job_ids)
        d["extra"] = dict(self.extra or {})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SubmissionRecord":
        return cls(
            cell_ids=tuple(str(c) for c in d["cell_ids"]),
            launcher=str(d["launcher"]),
            job_ids=tuple(str(j) for j in d["job_ids"]),
            array=bool(d.get("array", False)),
            submitted_unix_s=float(d.get("submitted_unix_s", 0.0)),
            attempt=int(d.get("attempt", 0)),
            extra=dict(d.get("extra") or {}),
        )


@contextlib.contextmanager
def submit_lock(paths: SweepPaths, command: str = "sweep", *, wait_s: float = 0.0) -> Iterator[None]:
    """One command at a time changes which jobs run a sweep's cells (sweep,
    resubmit, cancel): two resubmits at once would each see a failed cell as
    failed and both submit it, and a cancel during a submission would miss the
    cells not yet queued. An flock on SWEEP/.submit.lock, released when the
    process ends however it ends; the holder writes its pid and command there
    so that a waiting command can name it. ``wait_s``: how long to wait for
    the holder before giving up (LaunchError)."""
    import fcntl

    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / ".submit.lock", "a+") as f:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(f)
                if time.monotonic() >= deadline:
                    raise LaunchError(f"{holder} is changing the cells of {paths.root} right now; wait for it to "
                                      f"finish, then check `wattsweep status {quoted(paths.root)}`") from None
                if not told:
                    print(f"wattsweep {command}: waiting up to {wait_s:g} s for {holder} to finish with {paths.root}",
                          file=sys.stderr)
                    told = True
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} {command}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lock_holder(f: Any) -> str:
    """'`wattsweep resubmit` (pid 123)' from the lock file, or a general phrase."""
    try:
        f.seek(0)
        pid, command = f.read().split()[:2]
        return f"`wattsweep {command}` (pid {int(pid)})"
    except (ValueError, OSError):
        return "another wattsweep command (sweep, resubmit or cancel)"


def append_submissions(paths: SweepPaths, records: list[SubmissionRecord]) -> None:
    """Append records to submissions.jsonl (one line each, fsynced: the file is the
    only memory of which job ran which cell)."""
    if not records:
        return
    paths.root.mkdir(parents=True, exist_ok=True)
    append_lines(paths.submissions_jsonl, "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in records))


def append_lines(path: Path, text: str) -> None:
    """Append whole lines to a sweep's record file (submissions, cancellations),
    fsynced: these files are the only memory of what was done to the jobs. A
    last line cut short by a crash is left on its own line."""
    if _ends_torn(path):
        text = "\n" + text
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _ends_torn(path: Path) -> bool:
    """The file's last line lacks its newline (an append cut short)."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # missing or empty
        return False


def read_submissions(paths: SweepPaths) -> list[SubmissionRecord]:
    """All submissions, oldest first.

    A line that is not JSON at all is an append cut short by a crash (each
    record is one write of a whole line): it is skipped with a warning, so one
    torn line does not lock the user out of status and resubmit. A line that
    is JSON but not a submission record raises ValueError naming file and line."""
    path = paths.submissions_jsonl
    if not path.exists():
        return []
    out: list[SubmissionRecord] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError:
                print(f"wattsweep: warning: {path}:{lineno}: skipped a line cut short (a crash while recording a "
                      "submission?); its cells may show as planned though their jobs ran", file=sys.stderr)
                continue
            try:
                out.append(SubmissionRecord.from_dict(d))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed submission line ({e})") from None
    return out


def latest_submission_by_cell(paths: SweepPaths) -> dict[str, tuple[SubmissionRecord, str]]:
    """cell id -> (its latest submission record, its job id there)."""
    out: dict[str, tuple[SubmissionRecord, str]] = {}
    for rec in read_submissions(paths):
        for cid, jid in zip(rec.cell_ids, rec.job_ids):
            out[cid] = (rec, jid)
    return out


# ---------------------------------------------------------------------------
# Cell folders
# ---------------------------------------------------------------------------

# Outputs of one attempt; caps.jsonl is an append-only ledger and stays in place.
ATTEMPT_OUTPUTS = ("telemetry", "requests", "DONE.json", "FAILED.json")


def next_attempt(paths: SweepPaths, cell_id: str) -> int:
    """The attempt number a new submission of this cell gets (0 for the first)."""
    adir = paths.attempts_dir(cell_id)
    if not adir.is_dir():
        return 0 if not _has_outputs(paths, cell_id) else 1
    nums = [int(p.name) for p in adir.iterdir() if p.name.isdigit()]
    return (max(nums) + 1 if nums else 0) + (1 if _has_outputs(paths, cell_id) else 0)


def _has_outputs(paths: SweepPaths, cell_id: str) -> bool:
    cdir = paths.cell_dir(cell_id)
    return any((cdir / name).exists() for name in ATTEMPT_OUTPUTS)


def prepare_cell_dir(paths: SweepPaths, cell_id: str) -> int | None:
    """Create the cell folder; move an earlier attempt's outputs into
    ``attempts/<n>/`` so that a rerun starts clean. Returns n, or None when there
    was nothing to move."""
    cdir = paths.cell_dir(cell_id)
    cdir.mkdir(parents=True, exist_ok=True)
    paths.launch_dir(cell_id).mkdir(parents=True, exist_ok=True)
    present = [name for name in ATTEMPT_OUTPUTS if (cdir / name).exists()]
    if not present:
        return None
    adir = paths.attempts_dir(cell_id)
    adir.mkdir(exist_ok=True)
    nums = [int(p.name) for p in adir.iterdir() if p.name.isdigit()]
    n = max(nums) + 1 if nums else 0
    dest = adir / str(n)
    dest.mkdir()
    for name in present:
        shutil.move(str(cdir / name), str(dest / name))
    return n


def make_task(paths: SweepPaths, cell: PlannedCell, attempt: int = 0) -> CellTask:
    """The callable submitit pickles for one cell."""
    return CellTask(
        sweep_dir=str(paths.root.resolve()),
        cell_id=cell.cell_id,
        params=cell.params,
        options=cell.options,
        attempt=attempt,
    )


# ---------------------------------------------------------------------------
# The interface and its registry
# ---------------------------------------------------------------------------


@runtime_checkable
class Launcher(Protocol):
    name: str

    def submit(self, paths: SweepPaths, cells: list[PlannedCell], *, dry_run: bool = False) -> list[SubmissionRecord]:
        """Queue feasible cells and return at once. Calls prepare_cell_dir for each
        cell, appends the records to submissions.jsonl (not on dry_run), and raises
        LaunchError naming the cells it could not queue (after recording those it did).
        On dry_run: print what would be submitted, write nothing, return []."""
        ...

    def wait(self, paths: SweepPaths, records: list[SubmissionRecord]) -> None:
        """Block until every job of these records has ended."""
        ...


LauncherFactory = Callable[[Mapping[str, Any]], Launcher]

# name -> "module:attribute" (imported on first use) or a factory
_REGISTRY: dict[str, str | LauncherFactory] = {
    "local": "orchestrator.submit.local:LocalLauncher",
    "slurm": "orchestrator.submit.slurm:SlurmLauncher",
}


def register_launcher(name: str, factory: str | LauncherFactory) -> None:
    """Add a launcher: a factory taking the launcher config, or "module:attr"."""
    _REGISTRY[name] = factory


def launcher_names() -> list[str]:
    return sorted(_REGISTRY)


def get_launcher(name: str, launcher_cfg: Mapping[str, Any] | None = None) -> Launcher:
    """The launcher called ``name``, built from its resolved config (a plain dict)."""
    if name not in _REGISTRY:
        raise LaunchError(f"unknown launcher {name!r}; valid: {', '.join(launcher_names())}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                raise LaunchError(f"launcher {name!r} is not available in this installation ({module_name} missing)") from None
            raise
        factory = getattr(module, attr)
    return factory(dict(launcher_cfg or {}))


def now_s() -> float:
    return time.time()


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
