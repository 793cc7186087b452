"""Energy and sample gaps inside each rank's measured window (docs/metrics.md).

``integrate_power_j`` and ``max_gap_s`` are the definitions, one rank at a time.
``window_integrals`` computes the same numbers for every rank of a cell at once:
a per-rank loop spent its time in numpy call overhead on a few hundred rows per
rank, so here every step is one numpy call over the whole cell (all ranks'
rows, concatenated in rank order) and the window edges are arrays of one value
per rank. The floating-point operations are the per-rank ones, in the same
order, so the results are the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass(frozen=True)
class RankWindows:
    """Each rank's window [ws, we] (ns), per rank and repeated per row.

    ``start[i]`` and ``counts[i]`` locate rank i's rows in the cell's arrays.
    """

    ws_ns: np.ndarray
    we_ns: np.ndarray
    start: np.ndarray
    counts: np.ndarray
    ws_row_ns: np.ndarray
    we_row_ns: np.ndarray

    @classmethod
    def of(cls, offsets: list[int], ws_ns: list[int], we_ns: list[int]) -> "RankWindows":
        off = np.asarray(offsets, np.int64)
        counts = np.diff(off)
        ws, we = np.asarray(ws_ns, np.int64), np.asarray(we_ns, np.int64)
        return cls(ws, we, off[:-1], counts, np.repeat(ws, counts), np.repeat(we, counts))

    def in_window(self, ts_ns: np.ndarray) -> np.ndarray:
        """Rows inside their rank's window, edges included."""
        return (ts_ns >= self.ws_row_ns) & (ts_ns <= self.we_row_ns)


def window_integrals(ts: np.ndarray, p: np.ndarray, w: RankWindows) -> tuple[list[float], list[float]] | None:
    """integrate_power_j and max_gap_s of every rank (same numbers).

    None (use the per-rank definitions) for the unusual inputs: null power,
    time going backwards within a rank, a rank with fewer than two rows.
    """
    counts, start = w.counts, w.start
    if ts.size < 2 or counts.min() < 2 or np.isnan(p.sum()):
        return None
    d = ts[1:] - ts[:-1]
    same = np.ones(ts.size - 1, bool)  # pairs of rows of one rank
    same[start[1:] - 1] = False  # a pair that straddles two ranks may go back
    if (same & (d < 0)).any():
        return None
    le_ws, lt_we = ts <= w.ws_row_ns, ts < w.we_row_ns
    lt_ws, le_we = ts < w.ws_row_ns, ts <= w.we_row_ns
    inside = ~le_ws & lt_we
    pair = same & inside[:-1] & inside[1:]
    seg = np.repeat(np.arange(counts.size), counts)[:-1]
    body = np.bincount(seg[pair], weights=((p[:-1] + p[1:]) * d)[pair], minlength=counts.size) * 0.5e-9
    incl = ~lt_ws & le_we
    inner_gap = np.maximum.reduceat(np.where(same & incl[:-1] & incl[1:], d, 0), start)
    # Per rank, what np.searchsorted(rank's times, edge, side) gives: each
    # rank's times are sorted, so it is the number of its rows before the edge.
    n_before = np.add.reduceat(np.stack([le_ws, lt_we, lt_ws, le_we]), start, axis=1, dtype=np.int64)
    return _edges(ts, p, w, n_before, body.tolist(), inner_gap.tolist())


# The samples _edges reads for each rank, in this order: the two around ws,
# the two around we, the first and last inside the window, and the rank's
# first and last (np.interp clamps to them).
_AROUND_WS, _AROUND_WE, _FIRST_IN, _LAST_IN, _ENDS, _PER_RANK = 0, 2, 4, 5, 6, 8


def _edges(ts: np.ndarray, p: np.ndarray, w: RankWindows, n_before: np.ndarray, body: list[float],
           inner_gap: list[int]) -> tuple[list[float], list[float]]:
    """Add each rank's edge trapezoids to its body energy and its edge gaps to
    its inner gap. A handful of numbers per rank: plain Python arithmetic on
    them costs less than numpy calls on arrays of one value per rank (each
    call costs microseconds here), and gives the same floating-point results."""
    # Per rank: first sample after ws, first at/after we, first at/after ws, one past the last at/before we.
    js, ks, los, his = n_before.tolist()
    counts, wss, wes = w.counts.tolist(), w.ws_ns.tolist(), w.we_ns.tolist()
    idx: list[int] = []
    for s, n, j, k, lo, hi in zip(w.start.tolist(), counts, js, ks, los, his):
        last = n - 1
        idx += [s + min(max(j - 1, 0), last), s + min(j, last), s + min(max(k - 1, 0), last), s + min(k, last),
                s + min(lo, last), s + max(hi - 1, 0), s, s + last]
    tv, pv = ts[idx].tolist(), p[idx].tolist()
    energies, gaps = [], []
    for i, (n, ws, we, j, k, lo, hi) in enumerate(zip(counts, wss, wes, js, ks, los, his)):
        a = i * _PER_RANK
        t, pw = tv[a:a + _PER_RANK], pv[a:a + _PER_RANK]
        if we <= ws:
            energies.append(0.0)
        else:
            p0, p1 = _power_at(t, pw, _AROUND_WS, ws, j, n), _power_at(t, pw, _AROUND_WE, we, k, n)
            if j < k:  # samples inside: trapezoids from each edge to the nearest one
                first, last = _AROUND_WS + 1, _AROUND_WE
                edge = (p0 + pw[first]) * (t[first] - ws) + (pw[last] + p1) * (we - t[last])
            else:
                edge = (p0 + p1) * (we - ws)
            energies.append(body[i] + edge * 0.5e-9)
        g = max(inner_gap[i], t[_FIRST_IN] - ws, we - t[_LAST_IN]) if lo < hi else we - ws
        gaps.append(g * 1e-9)
    return energies, gaps


def _power_at(t: list[int], p: list[float], at: int, x: int, j: int, n: int) -> float:
    """Power at time x, where the rank's j-th sample is the first after x and
    t[at], t[at + 1] are its samples j - 1 and j (clamped): linear between
    them, clamped to the first and last sample (np.interp's definition)."""
    if j <= 0:
        return p[_ENDS]
    if j >= n:
        return p[_ENDS + 1]
    t0, t1 = t[at], t[at + 1]
    if t1 == t0:
        return p[at + 1]
    return p[at] + (p[at + 1] - p[at]) * ((x - t0) / (t1 - t0))
