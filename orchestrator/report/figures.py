"""The report's figures, each with the table behind it.

Every figure function takes the summary rows and returns a ``Figure``: the
table it is drawn from and, when the sweep has the dimensions it needs, a PNG.
A sweep that lacks a dimension (one shard count, no uncapped run) gets the
table and a note instead of an empty plot; the note names the planned values
that have no result, so a failed cell is not mistaken for a smaller sweep.
Figures built from flagged cells carry a caveat (``flags_note``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from orchestrator.report.data import Row, Series, data_label, distinct, flags_note, flags_of, series, sort_key, value_text

SERIES_KEYS = ("model", "gpu_name", "dataset", "kv_cache_dtype")
MAX_BARS = 40  # utilisation bars beyond this are unreadable; the table has them all
UNCAPPED = "cards at their default power limit"


@dataclass(frozen=True)
class Figure:
    key: str  # file stem and anchor
    title: str
    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    png: str | None = None  # file name beside index.html, None when skipped
    note: str | None = None
    flags_note: str | None = None  # caveat: flags of the cells behind the figure


def _uncapped_params(planned: Sequence[Row], which: str) -> list[Row]:
    """The planned cells a figure would have drawn, chosen as _uncapped chose the rows."""
    if which == UNCAPPED:
        return [p for p in planned if p.get("power_cap_w") is None]
    return list(planned)


def _no_result_note(key: str, have: Sequence[Any], planned: Sequence[Row], kind: str = "") -> str:
    """'; planned shards=1,2, but no cell with shards=2 has a valid result ...' or ''
    when every planned value of ``key`` has a result. ``kind``: the cells the
    figure draws ("uncapped "), so a capped cell's result is not read as missing."""
    wanted = distinct(planned, key)
    absent = [v for v in wanted if v not in have]
    if not absent:
        return ""
    return (f"; planned {key}={','.join(map(value_text, wanted))}, but no {kind}cell with "
            f"{key}={','.join(map(value_text, absent))} has a valid result yet (not done, or invalid; "
            "`wattsweep status` tells which)")


def _uncapped(rows: Sequence[Row]) -> tuple[list[Row], str]:
    """The paper's throughput/energy figures use cards at their default limit."""
    unc = [r for r in rows if r.get("power_cap_w") is None]
    if unc:
        return unc, UNCAPPED
    return list(rows), "all caps (no uncapped cells in this sweep)"


def _plot(out_dir: Path, key: str, title: str, x: str, panels: Sequence[tuple[str, str, list[Series]]],
          *, xlog: bool = False) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (ylabel, _, ss) in zip(axes[0], panels):
        for s in ss:
            xs = [p[0] for p in s.points]
            ax.plot(xs, [p[1] for p in s.points], marker="o", label=s.label)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        if xlog:
            ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    name = f"{key}.png"
    fig.savefig(out_dir / name, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return name


def _line_figure(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row], *, key: str, title: str, caption: str,
                 x: str, ys: Sequence[tuple[str, str]], by: Sequence[str]) -> Figure:
    """Lines of ys against x, one per group ``by``; skipped with a note if x has < 2 values.
    ``planned``: parameters of the feasible planned cells, to name the x values without a result."""
    use, which = _uncapped(rows) if "power_cap_w" not in by else (list(rows), "all caps")
    full_title = f"{title}{data_label(use)}"
    header = tuple(by) + (x,) + tuple(y for _, y in ys)
    table = sorted(
        (tuple(r.get(c) for c in header) for r in use),
        key=lambda t: tuple(sort_key(v) for v in t),
    )
    xs = distinct(use, x)
    caption = f"{caption} Cells: {which}."
    missing = _no_result_note(x, xs, _uncapped_params(planned, which), "uncapped " if which == UNCAPPED else "")
    caveat = flags_note(use)
    if len(xs) < 2:
        return Figure(key, full_title, caption, header, tuple(table), None,
                      f"skipped: needs at least two values of {x}; this sweep has {x}={xs[0] if xs else 'none'}{missing}",
                      caveat)
    panels = [(label, y, series(use, x, y, by)) for label, y in ys]
    png = _plot(out_dir, key, full_title, x, panels, xlog=x in ("batch_size", "shards"))
    # Drawn, yet a planned value may still be absent: say so rather than let the line look complete.
    note = f"drawn without some planned cells{missing}" if missing else None
    return Figure(key, full_title, caption, header, tuple(table), png, note, caveat)


def throughput_vs_shards(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    return _line_figure(
        rows, out_dir, planned, key="throughput_vs_shards", title="Inference throughput vs GPUs (shards)",
        caption="Words, tokens and responses per second over the measured window (paper Fig. 2 and 3).",
        x="shards", ys=[("words/s", "words_per_s"), ("tokens/s", "tokens_per_s"), ("responses/s", "responses_per_s")],
        by=SERIES_KEYS + ("batch_size",),
    )


def energy_vs_batch(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    return _line_figure(
        rows, out_dir, planned, key="energy_vs_batch", title="Energy per token and per response vs batch size",
        caption="Counter energy of all GPUs of the cell over the measured window, per output token and per response.",
        x="batch_size", ys=[("J/token", "energy_per_token_j"), ("J/response", "energy_per_response_j")],
        by=SERIES_KEYS + ("shards",),
    )


def energy_vs_shards(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    return _line_figure(
        rows, out_dir, planned, key="energy_vs_shards", title="Energy per token and per response vs GPUs (shards)",
        caption="Same energy as above, against the number of GPUs the model is sharded over.",
        x="shards", ys=[("J/token", "energy_per_token_j"), ("J/response", "energy_per_response_j")],
        by=SERIES_KEYS + ("batch_size",),
    )


def power_vs_shards(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    return _line_figure(
        rows, out_dir, planned, key="power_vs_shards", title="Total power of the cell's GPUs vs GPUs (shards)",
        caption="Mean power summed over the cell's GPUs (counter energy / window duration).",
        x="shards", ys=[("W (all GPUs)", "mean_power_w"), ("W per GPU", "mean_power_per_gpu_w")],
        by=SERIES_KEYS + ("batch_size",),
    )


CAP_CONFIG_KEYS = ("model", "gpu_name", "dataset", "weights", "kv_cache_dtype", "shards", "batch_size", "max_new_tokens",
                   "n_prompts", "seed")


def power_cap_tradeoff(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    """Each capped cell against the uncapped cell of the same configuration."""
    base: dict[tuple, Row] = {}
    for r in rows:
        if r.get("power_cap_w") is None:
            base[tuple(r.get(k) for k in CAP_CONFIG_KEYS)] = r
    derived: list[Row] = []
    paired: dict[str, Row] = {}  # both cells of every pair, once each: the caveat counts cells
    for r in rows:
        b = base.get(tuple(r.get(k) for k in CAP_CONFIG_KEYS))
        if r.get("power_cap_w") is None or b is None:
            continue
        paired.update({r.get("cell_id"): r, b.get("cell_id"): b})
        derived.append({
            **{k: r.get(k) for k in ("model", "gpu_name", "dataset", "shards", "batch_size", "power_cap_w", "cap_binding")},
            "energy_per_token_change_pct": _pct(r.get("energy_per_token_j"), b.get("energy_per_token_j")),
            "latency_p50_change_pct": _pct(r.get("latency_p50_s"), b.get("latency_p50_s")),
            "tokens_per_s_change_pct": _pct(r.get("tokens_per_s"), b.get("tokens_per_s")),
            "telemetry_source": r.get("telemetry_source"), "weights": r.get("weights"),
            # Flags of either cell: a change is only as sound as both of its ends.
            "flags": ",".join(sorted(flags_of(r) | flags_of(b))),
        })
    header = ("model", "gpu_name", "dataset", "shards", "batch_size", "power_cap_w", "cap_binding",
              "energy_per_token_change_pct", "latency_p50_change_pct", "tokens_per_s_change_pct", "flags")
    table = tuple(sorted((tuple(d.get(c) for c in header) for d in derived), key=lambda t: tuple(sort_key(v) for v in t)))
    title = f"Power cap trade-off: change from the uncapped run{data_label(derived or rows)}"
    caption = ("For each capped cell, the change in energy per token and in median response latency relative to the "
               "uncapped cell with the same model, GPUs, batch size and dataset (negative energy = saving).")
    if not derived:
        missing = _no_result_note("power_cap_w", distinct(rows, "power_cap_w"), planned)
        return Figure("power_cap", title, caption, header, table, None,
                      f"skipped: needs capped cells together with an uncapped cell of the same configuration{missing}")
    by = ("model", "gpu_name", "dataset", "shards", "batch_size")
    panels = [("energy/token change %", "energy_per_token_change_pct", series(derived, "power_cap_w", "energy_per_token_change_pct", by)),
              ("median latency change %", "latency_p50_change_pct", series(derived, "power_cap_w", "latency_p50_change_pct", by))]
    png = _plot(out_dir, "power_cap", title, "power cap (W)", panels)
    return Figure("power_cap", title, caption, header, table, png, None, flags_note(list(paired.values())))


def utilisation(rows: Sequence[Row], out_dir: Path, planned: Sequence[Row] = ()) -> Figure:
    header = ("model", "gpu_name", "shards", "batch_size", "power_cap_w", "dataset", "sm_util_pct", "mem_util_pct", "mem_used_gib")
    items = sorted(rows, key=lambda r: tuple(sort_key(r.get(c)) for c in header[:6]))
    table = tuple(tuple(r.get(c) for c in header[:-1]) + (_gib(r.get("mem_used_max_bytes")),) for r in items)
    title = f"GPU SM and memory utilisation per configuration{data_label(rows)}"
    caption = ("SM and memory-controller utilisation averaged over decode samples in the measured window; "
               "memory used is the largest reading of any GPU of the cell.")
    caveat = flags_note(items)
    if not items or all(r.get("sm_util_pct") is None for r in items):
        return Figure("utilisation", title, caption, header, table, None, "skipped: no utilisation readings", caveat)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = items[:MAX_BARS]
    labels = [f"{r.get('model')} s={r.get('shards')} b={r.get('batch_size')} cap={_cap(r.get('power_cap_w'))}" for r in shown]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.3 * len(shown) + 1.8), sharey=True)
    for ax, (name, vals) in zip(axes, [
        ("SM utilisation %", [r.get("sm_util_pct") or 0 for r in shown]),
        ("memory utilisation %", [r.get("mem_util_pct") or 0 for r in shown]),
        ("memory used (GiB, max GPU)", [_gib(r.get("mem_used_max_bytes")) or 0 for r in shown]),
    ]):
        ax.barh(range(len(shown)), vals)
        ax.set_xlabel(name)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(shown)), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "utilisation.png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    note = f"figure shows the first {MAX_BARS} of {len(items)} cells; the table has all" if len(items) > MAX_BARS else None
    return Figure("utilisation", title, caption, header, table, "utilisation.png", note, caveat)


# Each takes the summary rows, the output folder and the feasible planned cells' parameters.
ALL_FIGURES: tuple[Callable[[Sequence[Row], Path, Sequence[Row]], Figure], ...] = (
    throughput_vs_shards, energy_vs_batch, energy_vs_shards, power_vs_shards, power_cap_tradeoff, utilisation,
)


def _pct(v: Any, base: Any) -> float | None:
    if v is None or base in (None, 0):
        return None
    return 100.0 * (float(v) / float(base) - 1.0)


def _gib(b: Any) -> float | None:
    return None if b is None else round(float(b) / (1 << 30), 2)


def _cap(c: Any) -> str:
    return "none" if c is None else f"{c:g}W"
