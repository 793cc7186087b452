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

# Flags (docs/metrics.md "flags").
GAP_PERIODS = 2.0  # a gap longer than this many sample periods inside the window
CROSS_CHECK_MAX_PCT = 5.0  # |integrated - counter| / counter above this
CAP_MARGIN = 0.05  # mean power per GPU below cap * (1 - margin): the cap did not bind


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
        offsets = [0]
        for t in tables:
            offsets.append(offsets[-1] + t.num_rows)
        # concat_tables ignores schema metadata when it compares schemas: one
        # replace on the result instead of one per rank.
        table = pa.concat_tables(tables).replace_schema_metadata(None)
        return cls(table, list(ranks), offsets, list(metas))


@dataclass(frozen=True)
class RankEnergy:
    counter_j: float | None
    integrated_j: float
    max_gap_s: float


def integrate_power_j(ts_ns: np.ndarray, power_w: np.ndarray, ws_ns: int, we_ns: int) -> float:
    """Trapezoid of power over [ws, we]; the edges are interpolated from the
    nearest samples so the window's energy does not depend on where ticks fell."""
    ok = ~np.isnan(power_w)
    ts, p = ts_ns[ok], power_w[ok]
    if ts.size == 0 or we_ns <= ws_ns:
        return 0.0
    if ts.size > 1 and np.any(ts[1:] < ts[:-1]):
        order = np.argsort(ts, kind="stable")
        ts, p = ts[order], p[order]
    inside = (ts > ws_ns) & (ts < we_ns)
    t = np.concatenate(([ws_ns], ts[inside], [we_ns])).astype(np.float64)
    edge = np.interp([ws_ns, we_ns], ts.astype(np.float64), p)
    y = np.concatenate(([edge[0]], p[inside], [edge[1]]))
    return float(np.dot(y[1:] + y[:-1], np.diff(t)) * 0.5e-9)


def max_gap_s(ts_ns: np.ndarray, ws_ns: int, we_ns: int) -> float:
    """Longest stretch of the window with no sample (edges count)."""
    inside = ts_ns[(ts_ns >= ws_ns) & (ts_ns <= we_ns)]
    t = np.concatenate(([ws_ns], np.sort(inside), [we_ns]))
    return float(np.max(np.diff(t))) * 1e-9


def _rank_energies(cell: CellTelemetry, ts: np.ndarray, power: np.ndarray) -> list[RankEnergy]:
    fast = _fast_integrals(cell, ts, power)
    out = []
    for i, meta in enumerate(cell.metas):
        a, b = cell.offsets[i], cell.offsets[i + 1]
        ws, we = int(meta["window_start_ns"]), int(meta["window_end_ns"])
        es, ee = meta.get("energy_start_j"), meta.get("energy_end_j")
        counter = float(ee) - float(es) if es is not None and ee is not None else None
        if counter is not None and counter < 0:
            counter = None  # the counter went back (driver reload): it cannot measure this window
        if fast is not None:
            integrated, gap = fast[0][i], fast[1][i]
        else:
            integrated, gap = integrate_power_j(ts[a:b], power[a:b], ws, we), max_gap_s(ts[a:b], ws, we)
        out.append(RankEnergy(counter, integrated, gap))
    return out


def _fast_integrals(cell: CellTelemetry, ts: np.ndarray, p: np.ndarray) -> tuple[list[float], list[float]] | None:
    """integrate_power_j and max_gap_s of every rank at once (same results).

    The per-rank versions spend their time in numpy call overhead on a few
    hundred rows; here the inner sums run once over the whole cell and only
    the window edges are handled per rank. Returns None (use the per-rank
    versions) for the unusual inputs: null power, unsorted time, a rank with
    fewer than two rows.
    """
    off = np.asarray(cell.offsets)
    counts = np.diff(off)
    if ts.size < 2 or np.any(counts < 2) or np.isnan(p).any():
        return None
    d = np.diff(ts)
    same = np.ones(ts.size - 1, bool)
    same[off[1:-1] - 1] = False  # pairs that straddle two ranks
    if np.any(d[same] < 0):
        return None
    ws = np.array([int(m["window_start_ns"]) for m in cell.metas], np.int64)
    we = np.array([int(m["window_end_ns"]) for m in cell.metas], np.int64)
    ws_row, we_row = np.repeat(ws, counts), np.repeat(we, counts)
    inside = (ts > ws_row) & (ts < we_row)
    pair = same & inside[:-1] & inside[1:]
    seg = np.repeat(np.arange(len(counts)), counts)[:-1]
    body = np.bincount(seg[pair], weights=((p[:-1] + p[1:]) * d)[pair], minlength=len(counts)) * 0.5e-9
    incl = (ts >= ws_row) & (ts <= we_row)
    gaps_in = np.where(same & incl[:-1] & incl[1:], d, 0)
    inner_gap = np.maximum.reduceat(gaps_in, off[:-1])
    energies, gaps = [], []
    for i in range(len(counts)):
        a, b = int(off[i]), int(off[i + 1])
        t, pw = ts[a:b], p[a:b]
        w0, w1 = int(ws[i]), int(we[i])
        if w1 <= w0:
            energies.append(0.0)
        else:
            j = int(np.searchsorted(t, w0, "right"))
            k = int(np.searchsorted(t, w1, "left"))
            p0, p1 = _interp_at(t, pw, w0, j), _interp_at(t, pw, w1, k)
            if j < k:
                edge = (p0 + pw[j]) * (t[j] - w0) + (pw[k - 1] + p1) * (w1 - t[k - 1])
            else:
                edge = (p0 + p1) * (w1 - w0)
            energies.append(float(body[i] + edge * 0.5e-9))
        lo = int(np.searchsorted(t, w0, "left"))
        hi = int(np.searchsorted(t, w1, "right"))
        if lo < hi:
            g = max(int(inner_gap[i]), int(t[lo]) - w0, w1 - int(t[hi - 1]))
        else:
            g = w1 - w0
        gaps.append(g * 1e-9)
    return energies, gaps


def _interp_at(t: np.ndarray, p: np.ndarray, x: int, j: int) -> float:
    """Power at time x, where t[j] is the first sample after x (np.interp's clamping)."""
    if j <= 0:
        return float(p[0])
    if j >= t.size:
        return float(p[-1])
    t0, t1 = int(t[j - 1]), int(t[j])
    if t1 == t0:
        return float(p[j])
    return float(p[j - 1] + (p[j] - p[j - 1]) * ((x - t0) / (t1 - t0)))


def telemetry_metrics(cell: CellTelemetry, shards: int, power_cap_w: float | None) -> dict[str, Any]:
    ws = min(int(m["window_start_ns"]) for m in cell.metas)
    we = max(int(m["window_end_ns"]) for m in cell.metas)
    duration_s = (we - ws) * 1e-9
    ts = cell.table.column("timestamp_ns").to_numpy()
    power = _floats(cell.table.column("power_w"))
    energies = _rank_energies(cell, ts, power)
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
    binding = None
    if power_cap_w is not None and per_gpu_w is not None:
        binding = bool(per_gpu_w >= float(power_cap_w) * (1.0 - CAP_MARGIN))
    flags = []
    if cross is not None and abs(cross) > CROSS_CHECK_MAX_PCT:
        flags.append("cross_check")
    if binding is False:
        flags.append("cap_not_binding")
    if gap > GAP_PERIODS * period:
        flags.append("gap")
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
        **_window_stats(cell, ts, power),
    }


def _window_stats(cell: CellTelemetry, ts: np.ndarray, power: np.ndarray) -> dict[str, Any]:
    """Utilisation over decode rows, memory and power peaks over the window."""
    t = cell.table
    counts = np.diff(cell.offsets)
    ws = np.repeat([int(m["window_start_ns"]) for m in cell.metas], counts)
    we = np.repeat([int(m["window_end_ns"]) for m in cell.metas], counts)
    win = (ts >= ws) & (ts <= we)
    decode = win & pc.equal(t.column("phase"), "decode").to_numpy(zero_copy_only=False)
    return {
        "sm_util_pct": _nanmean(_floats(t.column("sm_util_pct"))[decode]),
        "mem_util_pct": _nanmean(_floats(t.column("mem_util_pct"))[decode]),
        "mem_used_max_bytes": _int_or_none(_nanmax(_floats(t.column("mem_used_bytes"))[win])),
        "gpu_power_p99_w": _nanpct(power[win], 99.0),
        "power_limit_w": _nanmedian(_floats(t.column("power_limit_w"))[win]),
    }


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
    """Sum of an integer column, nulls skipped, 0 when empty (pc.sum's
    definition); numpy's sum where there are no nulls costs less than the
    compute call and gives the same integer."""
    if col.null_count:
        return int(pc.sum(col).as_py() or 0)
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
    return a[~np.isnan(a)]


def _nanmean(a: np.ndarray) -> float | None:
    a = _clean(a)
    return float(a.mean()) if a.size else None


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
