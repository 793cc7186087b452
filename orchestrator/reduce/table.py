"""A readable, aligned text table of a summary (what `wattsweep reduce` prints)."""
from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa

# The columns a person reads first; the full set is in results/summary.csv.
DEFAULT_COLUMNS = (
    "cell_id", "model", "shards", "batch_size", "power_cap_w", "dataset", "gpu_name",
    "n_responses", "output_tokens", "duration_s", "tokens_per_s", "words_per_s", "responses_per_s",
    "energy_j", "mean_power_w", "energy_per_token_j", "energy_per_response_j",
    "sm_util_pct", "mem_util_pct", "cross_check_err_pct", "telemetry_source", "flags",
)


def format_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Align text cells: numbers right, text left."""
    cells = [[format_value(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) for i in range(len(header))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(vals, widths, numeric)).rstrip()

    out = [line(list(header)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_table(table: pa.Table, columns: Sequence[str] | None = None) -> str:
    """The summary as aligned text; columns missing from the table are left out."""
    if table.num_rows == 0:
        return "(no cells)"
    cols = [c for c in (columns or DEFAULT_COLUMNS) if c in table.column_names]
    data = [table.column(c).to_pylist() for c in cols]
    rows = list(zip(*data))
    return format_rows(cols, rows) + _simulated_note(table)


def _simulated_note(table: pa.Table) -> str:
    """A line under a table holding simulated rows: whatever columns were chosen, a
    reader must not take those watts and joules for a card's."""
    if "telemetry_source" not in table.column_names:
        return ""
    n = table.column("telemetry_source").to_pylist().count("simulated")
    if not n:
        return ""
    return (f"\nsimulated: {n} of {table.num_rows} row(s) come from the simulated GPU backend; their power and "
            f"energy are a model's, not a card's measurement")
