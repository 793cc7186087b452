"""The cap ledger: one JSON line per power-limit change, append-only.

Each record is written with a single ``write`` on an ``O_APPEND`` descriptor
and fsync'd before the call returns, so concurrent writers (every rank of a
sweep, every job on a node) never interleave and a crash never loses a
record that was reported written. Records go to the sweep's
``cells/<id>/caps.jsonl`` and to the site ledger.

Fields: time (ISO 8601 UTC), time_unix_s, user, host, node, slurm_job_id,
slurm_array_task_id, partition, account, cell_id, gpu_uuid, index, name,
previous_w, requested_w, enforced_w, action (apply | restore | repair),
result (ok | failed | observed), error, backend.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from workers.gpu.base import GpuError
from workers.gpu.state import current_user, node_name

SITE_LEDGER = Path("/var/log/wattsweep/caps.jsonl")
ACTIONS = ("apply", "restore", "repair")
RESULTS = ("ok", "failed", "observed")
FIELDS = (
    "time", "time_unix_s", "user", "host", "node", "slurm_job_id", "slurm_array_task_id", "partition",
    "account", "cell_id", "gpu_uuid", "index", "name", "previous_w", "requested_w", "enforced_w",
    "action", "result", "error", "backend",
)


def site_ledger_path(configured: str | os.PathLike[str] | None = None) -> Path | None:
    """The site-wide ledger: the configured path, else $WATTSWEEP_SITE_LEDGER,
    else /var/log/wattsweep/caps.jsonl when an admin created that folder
    (None otherwise: no site ledger on this machine)."""
    explicit = configured or os.environ.get("WATTSWEEP_SITE_LEDGER")
    if explicit:
        return Path(explicit)
    return SITE_LEDGER if SITE_LEDGER.parent.is_dir() else None


def make_record(*, action: str, result: str, index: int, uuid: str, name: str, previous_w: float | None,
                requested_w: float | None, enforced_w: float | None, cell_id: str | None = None,
                slurm: Mapping[str, Any] | None = None, error: str | None = None, backend: str | None = None,
                user: str | None = None, host: str | None = None, node: str | None = None) -> dict[str, Any]:
    """One ledger record. host/node default to this process's; a repair made
    from elsewhere passes the GPU's own, so the audit matches it to the apply."""
    if action not in ACTIONS or result not in RESULTS:
        raise ValueError(f"ledger action {action!r}/result {result!r}; valid: {ACTIONS} / {RESULTS}")
    slurm = dict(slurm or {})
    now = time.time()
    return {
        "time": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="milliseconds"),
        "time_unix_s": now,
        "user": user or slurm.get("user") or current_user(),
        "host": host or socket.gethostname(),
        "node": node or node_name(),
        "slurm_job_id": slurm.get("job_id"),
        "slurm_array_task_id": slurm.get("array_task_id"),
        "partition": slurm.get("partition"),
        "account": slurm.get("account"),
        "cell_id": cell_id,
        "gpu_uuid": uuid,
        "index": index,
        "name": name,
        "previous_w": previous_w,
        "requested_w": requested_w,
        "enforced_w": enforced_w,
        "action": action,
        "result": result,
        "error": error,
        "backend": backend,
        # Who wrote this record. For a repair, "user" and the job are those of
        # the session that set the cap (so the audit pairs them); "by" names
        # the epilog, the admin or the next job that put the card back.
        "by": {"user": os.environ.get("SUDO_USER") or current_user(), "host": socket.gethostname(),
               "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
    }


class LedgerWriter:
    """Appends records to every ledger path (created with their folders)."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]]):
        seen: list[Path] = []
        for p in paths:
            path = Path(p)
            if path not in seen:
                seen.append(path)
        self.paths: tuple[Path, ...] = tuple(seen)

    def check_writable(self) -> None:
        """Raise GpuError unless every ledger can be appended to (nothing written)."""
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
            except OSError as exc:
                raise GpuError(f"cannot append to cap ledger {path}: {exc.strerror or exc}; fix the path or its "
                               f"permissions (gpu.site_ledger / WATTSWEEP_SITE_LEDGER)") from None

    def append(self, record: Mapping[str, Any], *, strict: bool = True) -> list[str]:
        """Write ``record`` to every path. strict: raise GpuError if any path
        fails (used before a card is changed: no change without a record);
        otherwise warn on stderr and return the errors (used when restoring:
        a full disk must never keep a cap on)."""
        line = (json.dumps(dict(record), sort_keys=True, default=str) + "\n").encode()
        errors = []
        for path in self.paths:
            try:
                _append_line(path, line)
            except OSError as exc:
                errors.append(f"cannot append to cap ledger {path}: {exc.strerror or exc}")
        if errors and strict:
            raise GpuError(errors[0] + "; fix the path or its permissions (gpu.site_ledger / WATTSWEEP_SITE_LEDGER)")
        for err in errors:
            print(f"wattsweep: warning: {err}", file=sys.stderr)
        return errors


def _append_line(path: Path, line: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write on O_APPEND: never interleaved with another writer
        os.fsync(fd)
    finally:
        os.close(fd)


LEDGER_KEYS = ("time_unix_s", "gpu_uuid", "action", "result")
LEDGER_LINE = ('a ledger line is one JSON object such as {"time_unix_s": 1714560000.0, "gpu_uuid": "GPU-...", '
               '"action": "apply", "result": "ok", ...} (docs/admin.md, "The ledger")')


def _is_record(value: Any) -> bool:
    return (isinstance(value, dict) and all(k in value for k in LEDGER_KEYS)
            and isinstance(value["time_unix_s"], (int, float)) and not isinstance(value["time_unix_s"], bool))


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of one ledger file, refusing a file that is not a ledger.

    A torn record (a writer killed mid-write on a network file system: a line
    that starts like a record but is not valid JSON) is skipped with a warning,
    and so is other garbage as the last line after records. A JSON line that is
    not a ledger record, text that is not JSON, or bytes that are not UTF-8
    raise ValueError naming the file and line."""
    out: list[dict[str, Any]] = []
    pending: tuple[int, str] | None = None  # garbage after records: a torn end only if nothing follows it
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if pending is not None:
                raise ValueError(f"{path}:{pending[0]} {pending[1]}; {LEDGER_LINE}")
            try:
                text = raw.decode("utf-8")
                value = json.loads(text)
            except UnicodeDecodeError:
                why = "is not UTF-8 text (a binary file?)"
            except ValueError:
                if text.lstrip().startswith("{"):
                    print(f"wattsweep: warning: {path}:{n} is not a JSON record (a torn write); skipped", file=sys.stderr)
                    continue
                why = "is not a JSON record"
            else:
                if not _is_record(value):
                    missing = [k for k in LEDGER_KEYS if k not in value] if isinstance(value, dict) else []
                    raise ValueError(f"{path}:{n} is not a cap ledger record"
                                     f"{' (no ' + ', '.join(missing) + ')' if missing else ''}; {LEDGER_LINE}")
                value.setdefault("_source", str(path))
                out.append(value)
                continue
            if not out:
                raise ValueError(f"{path}:{n} {why}; {LEDGER_LINE}")
            pending = (n, why)
    if pending is not None:
        print(f"wattsweep: warning: {path}:{pending[0]} {pending[1]} (a torn last line); skipped", file=sys.stderr)
    return out


def ledger_files(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Ledger files named by ``paths``: a file as is; a sweep folder gives its
    cells/*/caps.jsonl; any other folder its *.jsonl files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            cells = p / "cells"
            found = sorted(cells.glob("*/caps.jsonl")) if cells.is_dir() else sorted(p.glob("*.jsonl"))
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"ledger {p} does not exist; give a ledger file or a sweep folder")
    return out
