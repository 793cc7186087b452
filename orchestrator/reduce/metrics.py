"""One summary row per cell, from its validated telemetry and requests.

Every definition here is written out in docs/metrics.md; change both together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator.reduce.integrate import RankWindows, integrate_power_j, max_gap_s, window_integrals

# integrate_power_j and max_gap_s (the per-rank definitions) live in integrate.py.
__all__ = ["FLAG_MEANINGS", "BadValue", "CellTelemetry", "cap_binding", "integrate_power_j", "max_gap_s", "percentiles",
           "request_metrics", "telemetry_metrics"]

# Flags (docs/metrics.md "flags").
GAP_PERIODS = 2.0  # a gap longer than this many sample periods inside the window
CROSS_CHECK_MAX_PCT = 5.0  # |integrated - counter| / counter above this
# A cap binds when the GPUs reach it. The mean alone misses a cap that the
# GPUs sit at through the decode but not during prefill or the gaps between
# batches (a 150 W cap drew a 142 W mean with its p99 at 150 W, and changed the
# energy by 11-33%): so either the mean is near the cap or the p99 is at it.
CAP_MEAN_MARGIN = 0.05  # binding when mean power per GPU >= cap * (1 - this)
CAP_P99_MARGIN = 0.02  # or when the per-GPU p99 power >= cap * (1 - this)
# The energy counter advances in steps: on an H200 it updates every 100 ms, so a
# reading at either end of the window can be up to 100 ms of energy stale. Over a
# window shorter than this, that step alone can move the cell's energy by more
# than 4% (4 repeats of a 0.42 s cell on an H200 spread 25%, docs/results).
SHORT_WINDOW_S = 5.0
# An enforced limit further than this from the cap (the larger of the two) is
# not the cap: cards enforce what was set to the watt (gpu.cap_tolerance_w is 1 W).
CAP_ENFORCED_TOLERANCE_W = 2.0
CAP_ENFORCED_TOLERANCE_FRACTION = 0.01
# What each flag warns of, in a few words (docs/metrics.md "flags"): the report
# prints these under every figure and comparison built from flagged cells.
FLAG_MEANINGS = {
    "cap_not_binding": "the GPUs did not reach the power cap, so the cap cannot explain a change",
    "cross_check": f"integrated power and the energy counter differ by more than {CROSS_CHECK_MAX_PCT:g}%",
    "gap": f"the telemetry has a gap longer than {GAP_PERIODS:g} sample periods inside the window",
    "short_window": (f"measured window under {SHORT_WINDOW_S:g} s: the energy counter's 100 ms steps can move "
                     "its energy by more than 4%, and timing noise its rates"),
    "truncated": "prompts were cut to max_prompt_tokens: shorter prompts than the dataset holds",
    "cap_not_enforced": ("the GPUs' enforced limit was not the cap during the window (observe mode, or the cap "
                         "was removed mid-cell): these are not measurements at the cap"),
}


class BadValue(ValueError):
    """The telemetry holds a value no metric can be built on; the message names it."""


@dataclass(frozen=True)
class CellTelemetry:
    """All ranks' telemetry of one cell, concatenated in rank order.

    ``offsets[i]:offsets[i+1]`` are rank ``ranks[i]``'s rows; ``metas[i]`` is the
    window/energy metadata of that rank's file. Keeping one table lets every
    column be converted to numpy once per cell rather than once per rank.
    """

    table: pa.Table
    ranks: list[int]
    offsets: list[int]
    metas: list[dict[str, Any]]

    @classmethod
    def of(cls, tables: list[pa.Table], ranks: list[int], metas: list[dict[str, Any]]) -> "CellTelemetry":
        # concat_tables ignores schema metadata when it compares schemas: one
        # replace on the result instead of one per rank.
        table = pa.concat_tables(tables).replace_schema_metadata(None)
        return cls.of_table(table, ranks, [t.num_rows for t in tables], metas)

    @classmethod
    def of_table(cls, table: pa.Table, ranks: list[int], rows: list[int], metas: list[dict[str, Any]]) -> "CellTelemetry":
        """From the ranks' rows already in one table, ``rows[i]`` of rank ``ranks[i]`` in order."""
        offsets = [0]
        for n in rows:
            offsets.append(offsets[-1] + n)
        return cls(table, list(ranks), offsets, list(metas))


@dataclass(frozen=True)
class RankEnergy:
    counter_j: float | None
    integrated_j: float
    max_gap_s: float


def _rank_energies(cell: CellTelemetry, ts: np.ndarray, power: np.ndarray, windows: RankWindows) -> list[RankEnergy]:
    fast = window_integrals(ts, power, windows)
    out = []
    for i, meta in enumerate(cell.metas):
        es, ee = meta.get("energy_start_j"), meta.get("energy_end_j")
        counter = float(ee) - float(es) if es is not None and ee is not None else None
        if counter is not None and counter < 0:
            counter = None  # the counter went back (driver reload): it cannot measure this window
        if fast is not None:
            integrated, gap = fast[0][i], fast[1][i]
        else:
            a, b = cell.offsets[i], cell.offsets[i + 1]
            ws, we = int(meta["window_start_ns"]), int(meta["window_end_ns"])
            integrated, gap = integrate_power_j(ts[a:b], power[a:b], ws, we), max_gap_s(ts[a:b], ws, we)
        out.append(RankEnergy(counter, integrated, gap))
    return out


def rank_windows(cell: CellTelemetry) -> RankWindows:
    """Each rank's measured window, located in the cell's concatenated rows."""
    return RankWindows.of(cell.offsets, [int(m["window_start_ns"]) for m in cell.metas],
                          [int(m["window_end_ns"]) for m in cell.metas])


def telemetry_metrics(cell: CellTelemetry, shards: int, power_cap_w: float | None) -> dict[str, Any]:
    ws = min(int(m["window_start_ns"]) for m in cell.metas)
    we = max(int(m["window_end_ns"]) for m in cell.metas)
    duration_s = (we - ws) * 1e-9
    ts = cell.table.column("timestamp_ns").to_numpy()
    power = _floats(cell.table.column("power_w"))
    # NaN is a missing reading (skipped); a negative or infinite one is not a reading.
    if np.isinf(power).any() or (power < 0).any():
        raise BadValue("power_w holds negative or infinite values")
    windows = rank_windows(cell)
    energies = _rank_energies(cell, ts, power, windows)
    counters = [e.counter_j for e in energies]
    integrated_j = sum(e.integrated_j for e in energies)
    if all(c is not None for c in counters):
        energy_j, method = float(sum(counters)), "counter"  # type: ignore[arg-type]
        cross = 100.0 * (integrated_j - energy_j) / energy_j if energy_j > 0 else None
    else:
        # Per rank: its counter where it has one, its integrated power otherwise.
        energy_j = float(sum(c if c is not None else e.integrated_j for c, e in zip(counters, energies)))
        method = "integrated" if all(c is None for c in counters) else "mixed"
        cross = None
    gap = max(e.max_gap_s for e in energies)
    period = max(float(m.get("sample_period_s") or 0.1) for m in cell.metas)
    mean_power_w = energy_j / duration_s if duration_s > 0 else None
    per_gpu_w = mean_power_w / shards if mean_power_w is not None and shards else None
    stats, limits = _window_stats(cell, ts, power, windows)
    binding = cap_binding(power_cap_w, per_gpu_w, stats["gpu_power_p99_w"])
    flags = []
    if cap_not_enforced(power_cap_w, limits):
        flags.append("cap_not_enforced")
    if cross is not None and abs(cross) > CROSS_CHECK_MAX_PCT:
        flags.append("cross_check")
    if binding is False:
        flags.append("cap_not_binding")
    if gap > GAP_PERIODS * period:
        flags.append("gap")
    if duration_s < SHORT_WINDOW_S:
        flags.append("short_window")
    return {
        "duration_s": duration_s,
        "energy_j": energy_j,
        "energy_method": method,
        "integrated_energy_j": integrated_j,
        "cross_check_err_pct": cross,
        "mean_power_w": mean_power_w,
        "mean_power_per_gpu_w": per_gpu_w,
        "cap_binding": binding,
        "max_gap_s": gap,
        "sample_period_s": period,
        "flags": ",".join(sorted(flags)),
        **stats,
    }


def cap_binding(power_cap_w: float | None, mean_power_per_gpu_w: float | None,
                gpu_power_p99_w: float | None) -> bool | None:
    """Whether the cap bound (docs/metrics.md ``cap_binding``): None without a
    cap (or without any power reading); True when the mean per-GPU power is
    within CAP_MEAN_MARGIN of the cap or the per-GPU p99 within CAP_P99_MARGIN."""
    if power_cap_w is None or (mean_power_per_gpu_w is None and gpu_power_p99_w is None):
        return None
    cap_w = float(power_cap_w)
    mean_near_cap = mean_power_per_gpu_w is not None and mean_power_per_gpu_w >= cap_w * (1.0 - CAP_MEAN_MARGIN)
    p99_at_cap = gpu_power_p99_w is not None and gpu_power_p99_w >= cap_w * (1.0 - CAP_P99_MARGIN)
    return bool(mean_near_cap or p99_at_cap)


def cap_not_enforced(power_cap_w: float | None, limits_w: np.ndarray) -> bool:
    """A cell run with a cap whose GPUs read another enforced limit during the
    window: observe mode (the cap was recorded, not set), or a cap pulled
    mid-cell (a restore from elsewhere). Its numbers are not those of the cap."""
    if power_cap_w is None:
        return False
    limits_w = limits_w[~np.isnan(limits_w)]
    if not limits_w.size:
        return False
    tolerance_w = max(CAP_ENFORCED_TOLERANCE_W, CAP_ENFORCED_TOLERANCE_FRACTION * float(power_cap_w))
    return bool(np.abs(limits_w - float(power_cap_w)).max() > tolerance_w)


def _window_stats(cell: CellTelemetry, ts: np.ndarray, power: np.ndarray,
                  windows: RankWindows) -> tuple[dict[str, Any], np.ndarray]:
    """Utilisation over decode rows, memory and power peaks over the window;
    and the enforced limits read in it (for the cap_not_enforced flag)."""
    t = cell.table
    win = windows.in_window(ts)
    decode = win & _equals(t.column("phase"), "decode")
    limits = _floats(t.column("power_limit_w"))[win]
    return {
        "sm_util_pct": _nanmean(_floats(t.column("sm_util_pct"))[decode]),
        "mem_util_pct": _nanmean(_floats(t.column("mem_util_pct"))[decode]),
        "mem_used_max_bytes": _int_or_none(_nanmax(_floats(t.column("mem_used_bytes"))[win])),
        "gpu_power_p99_w": _nanpct(power[win], 99.0),
        "power_limit_w": _nanmedian(limits),
    }, limits


def _equals(col: pa.ChunkedArray, value: str) -> np.ndarray:
    """Boolean mask of the rows equal to ``value`` (null rows: False).

    Dictionary chunks (the reducer reads phase so) are compared by their
    indices: comparing them as strings would first rebuild a string per row.
    The ranks' files normally share one dictionary: then one comparison."""
    chunks = col.chunks
    if not chunks:
        return np.zeros(0, bool)
    if not all(pa.types.is_dictionary(c.type) for c in chunks):
        return pc.fill_null(pc.equal(col, value), False).to_numpy(zero_copy_only=False)
    first = chunks[0].dictionary
    if all(c.dictionary.equals(first) for c in chunks[1:]):
        groups = [(first, pa.chunked_array([c.indices for c in chunks]))]
    else:
        groups = [(c.dictionary, pa.chunked_array([c.indices])) for c in chunks]
    parts = []
    for dictionary, indices in groups:
        hits = np.flatnonzero(dictionary.to_numpy(zero_copy_only=False) == value)
        idx = indices.to_numpy()  # nulls (none in telemetry written by the sampler) become NaN: never a hit
        parts.append(np.isin(idx, hits) if len(hits) != 1 else idx == hits[0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def request_metrics(req: pa.Table, duration_s: float, energy_j: float) -> dict[str, Any]:
    n = req.num_rows
    out_tok = _int_sum(req.column("output_tokens"))
    lat = (req.column("end_ns").to_numpy() - req.column("start_ns").to_numpy()) * 1e-9
    p50, p90, p99 = percentiles(lat, (50.0, 90.0, 99.0)) if n else (None, None, None)
    words = _int_sum(req.column("output_words"))
    return {
        "n_responses": n,
        "input_tokens": _int_sum(req.column("input_tokens")),
        "output_tokens": out_tok,
        "output_words": words,
        "tokens_per_s": _ratio(out_tok, duration_s),
        "words_per_s": _ratio(words, duration_s),
        "responses_per_s": _ratio(n, duration_s),
        "energy_per_token_j": _ratio(energy_j, out_tok),
        "energy_per_response_j": _ratio(energy_j, n),
        "latency_p50_s": p50,
        "latency_p90_s": p90,
        "latency_p99_s": p99,
    }


def _int_sum(col: pa.ChunkedArray) -> int:
    """Sum of an integer column, 0 when empty. Request rows with missing
    values are refused before the metrics (cell._check_requests), and their
    counts are bounded there, so numpy's int64 sum is exact."""
    return int(col.to_numpy().sum())


# -- small numeric helpers (None instead of NaN in results) -------------------


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """float64 numpy with NaN for nulls (one copy at most)."""
    if col.null_count:
        col = pc.fill_null(col.cast(pa.float64()), math.nan)
    return col.to_numpy().astype(np.float64, copy=False)


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _clean(a: np.ndarray) -> np.ndarray:
    """a without NaN (nulls); a itself when it has none. A NaN makes the sum
    NaN, and one sum costs less than the mask and copy that removing them takes."""
    return a[~np.isnan(a)] if np.isnan(a.sum()) else a


def _nanmean(a: np.ndarray) -> float | None:
    a = _clean(a)
    # np.mean's definition (pairwise sum over the count) without its Python wrapper.
    return float(a.sum() / a.size) if a.size else None


def _nanmax(a: np.ndarray) -> float | None:
    a = _clean(a)
    return float(a.max()) if a.size else None


def _nanmedian(a: np.ndarray) -> float | None:
    a = _clean(a)
    return percentiles(a, (50.0,))[0] if a.size else None


def _nanpct(a: np.ndarray, q: float) -> float | None:
    a = _clean(a)
    return percentiles(a, (q,))[0] if a.size else None


def percentiles(a: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """np.percentile's default (linear) definition via one np.partition:
    np.percentile's own bookkeeping costs more than the work on small arrays."""
    n = a.size
    pos = [q / 100.0 * (n - 1) for q in qs]
    idx = sorted({int(math.floor(x)) for x in pos} | {int(math.ceil(x)) for x in pos})
    part = np.partition(a, idx)
    out = []
    for x in pos:
        lo, hi = int(math.floor(x)), int(math.ceil(x))
        out.append(float(part[lo] + (part[hi] - part[lo]) * (x - lo)))
    return out


def _int_or_none(x: float | None) -> int | None:
    return None if x is None else int(x)
