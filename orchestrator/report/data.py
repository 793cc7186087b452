"""The summary rows a report is drawn from, and the labels they must carry."""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow.parquet as pq

from orchestrator.contracts import SweepPaths
from orchestrator.reduce.metrics import FLAG_MEANINGS
from orchestrator.submit.shell import quoted

# Telemetry sources that are measurements of a real card. Anything else
# (simulated backend, synthetic test data) is labelled "simulated".
MEASURED_SOURCES = frozenset({"nvml", "nvidia-smi"})

Row = dict[str, Any]


class ReportError(Exception):
    """The report cannot be made (the message says why)."""


def load_summary(sweep_dir: str | Path, *, reduce_first: bool = False) -> list[Row]:
    """Summary rows of a sweep; reduces it when asked, when never reduced, or
    when a cell finished after the last reduce."""
    paths = SweepPaths.of(sweep_dir)
    if not paths.root.is_dir():
        raise ReportError(f"no sweep folder at {paths.root}")
    if reduce_first or not paths.summary_parquet.exists() or _stale(paths):
        from orchestrator.reduce import reduce_sweep

        return reduce_sweep(paths.root).to_pylist()
    try:
        return pq.read_table(paths.summary_parquet).to_pylist()
    except Exception as e:  # noqa: BLE001 - a damaged summary: say so, suggest the fix
        raise ReportError(f"unreadable {paths.summary_parquet} ({type(e).__name__}); run `wattsweep reduce {quoted(paths.root)}`") from None


def _stale(paths: SweepPaths) -> bool:
    """A cell's DONE.json is newer than the summary: cells finished (or were
    rerun) since the last reduce, and the figures would contradict the counts
    of planned cells without a result. The reduce reuses unchanged cells, so
    reducing again costs little."""
    import os

    try:
        summary_ns = paths.summary_parquet.stat().st_mtime_ns
        with os.scandir(paths.cells_dir) as it:
            cells = [e.path for e in it if e.is_dir()]
    except OSError:
        return False
    for cdir in cells:
        try:
            if os.stat(f"{cdir}/DONE.json").st_mtime_ns > summary_ns:
                return True
        except OSError:
            continue
    return False


def is_simulated(rows: Iterable[Row]) -> bool:
    return any(not _measured(r.get("telemetry_source")) for r in rows)


def _measured(source: Any) -> bool:
    return bool(source) and all(s in MEASURED_SOURCES for s in str(source).split("+"))


def data_label(rows: Sequence[Row]) -> str:
    """' (simulated telemetry, random weights)' or '' - appended to titles."""
    parts = []
    if is_simulated(rows):
        parts.append("simulated telemetry")
    if any(r.get("weights") == "random" for r in rows):
        parts.append("random weights")
    return f" ({', '.join(parts)})" if parts else ""


def flags_of(row: Row) -> set[str]:
    """The summary's comma-separated ``flags`` as a set."""
    return {f for f in str(row.get("flags") or "").split(",") if f}


def flags_note(cells: Sequence[Row], what: str = "cells") -> str | None:
    """A caveat for a figure or comparison built from flagged cells: each flag,
    how many of ``cells`` carry it and what it means; None when none does.
    Without it a number such as +478% tokens/s from two 2-second cells reads
    as a finding (docs/metrics.md, ``flags``)."""
    counts = Counter(f for r in cells for f in flags_of(r))
    if not counts:
        return None
    n = len(cells)
    parts = [f"{flag} on {k} of {n} {what} ({FLAG_MEANINGS.get(flag, 'see docs/metrics.md')})"
             for flag, k in sorted(counts.items())]
    return "Flagged cells, read with care: " + "; ".join(parts) + ". Flags: docs/metrics.md."


def value_text(v: Any) -> str:
    """A parameter value as the notes write it: none for no cap, 150 for 150.0."""
    if v is None:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def distinct(rows: Iterable[Row], key: str) -> list[Any]:
    return sorted({r.get(key) for r in rows}, key=sort_key)


def sort_key(v: Any) -> tuple:
    """None first, then numbers, then text: a stable order for mixed columns."""
    if v is None:
        return (0, 0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, v, "")
    return (2, 0, str(v))


@dataclass(frozen=True)
class Series:
    """One line of a figure: its label and (x, mean y) points."""

    label: str
    key: tuple
    points: tuple[tuple[Any, float], ...]


def series(rows: Sequence[Row], x: str, y: str, by: Sequence[str], *, label: Callable[[tuple], str] | None = None) -> list[Series]:
    """Group rows by ``by``, average ``y`` over cells with the same x (seeds, repeats)."""
    groups: dict[tuple, dict[Any, list[float]]] = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        k = tuple(r.get(b) for b in by)
        groups.setdefault(k, {}).setdefault(r[x], []).append(float(r[y]))
    keys = sorted(groups, key=lambda t: tuple(sort_key(v) for v in t))
    # Label lines only by what differs between them; the title says the rest.
    varying = [i for i in range(len(by)) if len({k[i] for k in keys}) > 1] or [0]
    out = []
    for k in keys:
        pts = tuple((xv, statistics.fmean(vals)) for xv, vals in sorted(groups[k].items(), key=lambda kv: sort_key(kv[0])))
        text = label(k) if label else series_label([by[i] for i in varying], tuple(k[i] for i in varying))
        out.append(Series(text, k, pts))
    return out


def series_label(by: Sequence[str], key: tuple) -> str:
    short = {"batch_size": "batch", "power_cap_w": "cap", "gpu_name": "", "model": "", "dataset": "", "shards": "shards",
             "kv_cache_dtype": "KV"}
    parts = []
    for b, v in zip(by, key):
        name = short.get(b, b)
        if b == "power_cap_w":
            v = "none" if v is None else f"{v:g} W"
        parts.append(f"{name}={v}" if name else str(v))
    return " ".join(parts)
