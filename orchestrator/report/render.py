"""Write report/index.html (self-contained, PNGs beside it) and report/index.md."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator.contracts import SweepPaths, atomic_write_bytes
from orchestrator.reduce.table import format_value
from orchestrator.report.data import Row, data_label, is_simulated, load_summary
from orchestrator.report.figures import ALL_FIGURES, Figure

SUMMARY_COLUMNS = ("cell_id", "model", "gpu_name", "shards", "batch_size", "power_cap_w", "dataset",
                   "tokens_per_s", "words_per_s", "responses_per_s", "energy_per_token_j", "energy_per_response_j",
                   "mean_power_w", "cross_check_err_pct", "telemetry_source", "weights", "flags")

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 2em}td,th{border:1px solid #ccc;padding:2px 6px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}.note{color:#a15c00}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:0.5em 1em}img{max-width:100%}"""


@dataclass(frozen=True)
class Report:
    title: str
    banner: str | None
    no_result: str | None  # planned cells without a result (reduce's line), None when there are none
    summary_header: tuple[str, ...]
    summary_rows: tuple[tuple[Any, ...], ...]
    invalid: tuple[tuple[str, str], ...]
    figures: tuple[Figure, ...]


def build_report(sweep_dir: str | Path, *, reduce_first: bool = False) -> tuple[Report, Path]:
    """Compute figures (PNGs written into report/) and return what the pages show."""
    from orchestrator.reduce import read_invalid
    from orchestrator.reduce.coverage import coverage, planned_params
    from orchestrator.reduce.plan_io import read_plan_cells

    paths = SweepPaths.of(sweep_dir)
    rows = load_summary(paths.root, reduce_first=reduce_first)
    plan = read_plan_cells(paths)
    out = paths.report_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # a figure skipped this time must not show last time's picture
    planned = planned_params(plan)
    figures = tuple(f(rows, out, planned) for f in ALL_FIGURES) if rows else ()
    banner = None
    if is_simulated(rows):
        banner = ("Simulated telemetry: power and energy in this report come from a model of the card, "
                  "not from a measurement. Do not quote them as measured.")
    cols = tuple(c for c in SUMMARY_COLUMNS if not rows or c in rows[0])
    report = Report(
        title=f"wattsweep report: {paths.root.name}{data_label(rows)}",
        banner=banner,
        no_result=coverage(sweep_dir, plan).message(),
        summary_header=cols,
        summary_rows=tuple(tuple(r.get(c) for c in cols) for r in rows),
        invalid=tuple(read_invalid(paths.root)),
        figures=figures,
    )
    return report, out


def write_html(report: Report, out: Path) -> Path:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(report.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{_e(report.title)}</h1>"]
    if report.banner:
        parts.append(f"<p class='banner'>{_e(report.banner)}</p>")
    if report.no_result:
        parts.append(f"<p class='note'>{_e(report.no_result)}</p>")
    if not report.summary_rows:
        parts.append("<p class='note'>No done cells with valid outputs: nothing to plot. See <code>wattsweep status</code>.</p>")
    parts.append("<h2>Contents</h2><ul>" + "".join(f"<li><a href='#{f.key}'>{_e(f.title)}</a></li>" for f in report.figures)
                 + "<li><a href='#cells'>All cells</a></li></ul>")
    for f in report.figures:
        parts.append(f"<h2 id='{f.key}'>{_e(f.title)}</h2><p>{_e(f.caption)}</p>")
        if f.note:
            parts.append(f"<p class='note'>{_e(f.note)}</p>")
        if f.png:
            parts.append(f"<img src='{_e(f.png)}' alt='{_e(f.title)}'>")
        if f.flags_note:
            parts.append(f"<p class='note flags'>{_e(f.flags_note)}</p>")
        parts.append(_html_table(f.header, f.rows))
    parts.append(f"<h2 id='cells'>All cells{_e(_sim_suffix(report))}</h2>")
    parts.append(_html_table(report.summary_header, report.summary_rows))
    if report.invalid:
        parts.append("<h2>Invalid cells (not in any figure)</h2>" + _html_table(("cell_id", "reason"), report.invalid))
    parts.append("<p>Column definitions: docs/metrics.md.</p></body></html>\n")
    path = out / "index.html"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def write_markdown(report: Report, out: Path) -> Path:
    lines = [f"# {report.title}", ""]
    if report.banner:
        lines += [f"> **{report.banner}**", ""]
    if report.no_result:
        lines += [f"*{report.no_result}*", ""]
    if not report.summary_rows:
        lines += ["No done cells with valid outputs: nothing to plot. See `wattsweep status`.", ""]
    for f in report.figures:
        lines += [f"## {f.title}", "", f.caption, ""]
        if f.note:
            lines += [f"*{f.note}*", ""]
        if f.png:
            lines += [f"![{f.title}]({f.png})", ""]
        if f.flags_note:
            lines += [f"*{f.flags_note}*", ""]
        lines += [_md_table(f.header, f.rows), ""]
    lines += [f"## All cells{_sim_suffix(report)}", "", _md_table(report.summary_header, report.summary_rows), ""]
    if report.invalid:
        lines += ["## Invalid cells (not in any figure)", "", _md_table(("cell_id", "reason"), report.invalid), ""]
    lines += ["Column definitions: docs/metrics.md.", ""]
    path = out / "index.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _sim_suffix(report: Report) -> str:
    return " (simulated telemetry)" if report.banner else ""


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='{'n' if isinstance(v, (int, float)) else 't'}'>{_e(format_value(v))}</td>" for v in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "(no rows)"
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(format_value(v).replace("|", "/") for v in r) + " |" for r in rows]
    return "\n".join(out)


def rows_of(report: Report) -> list[Row]:
    return [dict(zip(report.summary_header, r)) for r in report.summary_rows]
