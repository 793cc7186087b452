"""The report: figures when the sweep has the dimensions, notes when not, labels always."""
from __future__ import annotations

import re

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import SweepPaths
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan


def _grid(root, *, shards=(1, 2), batches=(1, 8), caps=(None, 150), power=200.0):
    paths = SweepPaths.of(root)
    params = [cell_params(shards=s, batch_size=b, power_cap_w=c) for s in shards for b in batches for c in caps]
    write_plan(paths, params)
    for p in params:
        pw = power if p["power_cap_w"] is None else min(power, p["power_cap_w"])
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0, power_w=pw, n_responses=4 * p["batch_size"]))
    return paths


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    paths = _grid(tmp_path_factory.mktemp("r") / "sweep")
    assert cli_main(["report", str(paths.root)]) == 0
    return paths


def test_every_figure_is_drawn_with_its_table(full_report):
    out = full_report.report_dir
    html = (out / "index.html").read_text()
    pngs = re.findall(r"src='([^']+\.png)'", html)
    assert sorted(pngs) == sorted(["throughput_vs_shards.png", "energy_vs_batch.png", "energy_vs_shards.png",
                                   "power_vs_shards.png", "power_cap.png", "utilisation.png"])
    for name in pngs:
        assert (out / name).stat().st_size > 5000, name
    assert html.count("<table>") == 7  # one per figure + all cells
    assert "http" not in html.replace("http-equiv", "")  # opens from disk: nothing fetched


def test_simulated_data_is_labelled_everywhere(full_report):
    md = (full_report.report_dir / "index.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(titles) == 7
    assert all("simulated" in t for t in titles), titles
    assert all("random weights" in t for t in titles[:-1])
    assert "Simulated telemetry" in md.splitlines()[2]


def test_power_cap_table_has_the_change_from_uncapped(full_report):
    md = (full_report.report_dir / "index.md").read_text()
    section = md.split("## Power cap trade-off")[1].split("## ")[0]
    rows = [r for r in section.splitlines() if r.startswith("| llama-7b")]
    assert len(rows) == 4  # 2 shards x 2 batches, cap 150 against uncapped
    # energy per token falls 25% (150 W vs 200 W, same throughput), latency unchanged
    assert all("| -25.00 |" in r and "| 0 |" in r for r in rows), rows


def test_single_cell_sweep_skips_figures_with_notes(tmp_path, capsys):
    paths = _grid(tmp_path / "one", shards=(1,), batches=(8,), caps=(None,))
    assert cli_main(["report", str(paths.root), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert "skipped: needs at least two values of shards; this sweep has shards=1" in md
    assert "skipped: needs capped cells together with an uncapped cell" in md
    assert "![" in md  # the utilisation bars still draw for one cell
    assert not (paths.report_dir / "index.html").exists()
    assert sorted(p.name for p in paths.report_dir.glob("*.png")) == ["utilisation.png"]


def test_empty_sweep_reports_nothing_to_plot(tmp_path, capsys):
    paths = SweepPaths.of(tmp_path / "empty")
    write_plan(paths, [cell_params()])
    assert cli_main(["report", str(paths.root)]) == 1
    captured = capsys.readouterr()
    assert "no done cells" in captured.err and "Traceback" not in captured.err
    assert "No done cells" in (paths.report_dir / "index.html").read_text()


def test_missing_folder(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"wattsweep report: no sweep folder at {tmp_path / 'nope'}"


# -- planned cells without a result ----------------------------------------------


def _failed_shards_2(root):
    """The user study's sweep: shards 1 and 2 planned, the shards=2 cell failed."""
    from orchestrator.contracts import atomic_write_json, cell_id_of

    paths = SweepPaths.of(root)
    params = [cell_params(shards=s) for s in (1, 2)]
    write_plan(paths, params)
    write_cell(paths, params[0], CellSpec(seconds=11.0, warmup_s=1.0))
    atomic_write_json(paths.failed_marker(cell_id_of(params[1])), {"error": "CUDA out of memory"})
    return paths


def _notes_html(html):
    import html as h

    return [h.unescape(n) for n in re.findall(r"<p class='note[^']*'>(.*?)</p>", html)]


def _notes_md(md):
    return [line[1:-1] for line in md.splitlines() if line.startswith("*") and line.endswith("*") and len(line) > 2]


def test_report_names_planned_cells_without_a_result(tmp_path):
    paths = _failed_shards_2(tmp_path / "s")
    assert cli_main(["report", str(paths.root)]) == 0
    md = (paths.report_dir / "index.md").read_text()
    html = (paths.report_dir / "index.html").read_text()
    line = (f"1 of 2 planned cells has no result yet (1 failed (FAILED.json)); `wattsweep status {paths.root} --state "
            "failed,cancelled,timeout,missing,planned,pending,running,unknown` lists them")
    top = md.split("\n## ")[0]
    assert f"*{line}*" in top  # near the top: before the first figure
    assert line in _notes_html(html.split("<h2")[0])  # above the contents
    skipped = ("skipped: needs at least two values of shards; this sweep has shards=1; planned shards=1,2, "
               "but no uncapped cell with shards=2 has a valid result yet")
    for notes in (_notes_md(md), _notes_html(html)):
        assert sum(n.startswith(skipped) for n in notes) == 3, notes  # throughput, energy and power vs shards
    assert "planned batch_size" not in md  # batch_size=8 was the only planned value: nothing is missing


def test_figure_drawn_without_a_planned_value_says_so(tmp_path):
    from orchestrator.contracts import cell_id_of

    paths = SweepPaths.of(tmp_path / "s")
    params = [cell_params(shards=s) for s in (1, 2, 4)]
    write_plan(paths, params)
    for p in params[:2]:
        write_cell(paths, p, CellSpec(seconds=11.0, warmup_s=1.0))
    (paths.cell_dir(cell_id_of(params[2]))).mkdir(parents=True)  # submitted, never finished
    assert cli_main(["report", str(paths.root), "--format", "md"]) == 0
    md = (paths.report_dir / "index.md").read_text()
    section = md.split("## Inference throughput")[1].split("\n## ")[0]
    assert "![" in section
    assert ("*drawn without some planned cells; planned shards=1,2,4, but no uncapped cell with shards=4 has a valid result "
            "yet") in section


def test_every_planned_cell_done_adds_no_note(tmp_path):
    paths = _grid(tmp_path / "s", shards=(1,), batches=(8,), caps=(None,))
    assert cli_main(["report", str(paths.root), "--format", "md"]) == 0
    md = (paths.report_dir / "index.md").read_text()
    assert "no result" not in md and "planned shards" not in md


# -- flags under figures and comparisons --------------------------------------------


def test_flagged_cells_are_named_under_every_figure_and_comparison(full_report):
    """The grid's cells are 2 s windows: every cell is short_window."""
    md = (full_report.report_dir / "index.md").read_text()
    html = (full_report.report_dir / "index.html").read_text()
    meaning = "measured window under 5 s: the energy counter's 100 ms steps can move its energy by more than 4%"
    cap = md.split("## Power cap trade-off")[1].split("\n## ")[0]
    # 4 capped cells and the 4 uncapped cells they are compared with
    assert f"*Flagged cells, read with care: short_window on 8 of 8 cells ({meaning}" in cap
    assert cap.index("Flagged cells") < cap.index("| model")  # under the figure, above its numbers
    rows = [r for r in cap.splitlines() if r.startswith("| llama-7b")]
    assert rows and all(r.endswith("| short_window |") for r in rows)
    assert "| flags |" in cap
    # throughput, energy and power: the 4 uncapped cells; utilisation: all 8
    md_flags = [n for n in _notes_md(md) if n.startswith("Flagged cells")]
    assert [n.split(" cells (")[0].split("on ")[1] for n in md_flags] == ["4 of 4"] * 4 + ["8 of 8"] * 2
    # the HTML says the same, figure for figure
    assert [n for n in _notes_html(html) if n.startswith("Flagged cells")] == md_flags


def test_flag_notes_name_each_flag_with_its_count():
    from orchestrator.report.data import flags_note

    cells = [{"flags": "cap_not_binding,short_window"}, {"flags": "short_window"}, {"flags": ""}, {"flags": None}]
    note = flags_note(cells)
    assert note.startswith("Flagged cells, read with care: cap_not_binding on 1 of 4 cells (the GPUs did not reach "
                           "the power cap")
    assert "; short_window on 2 of 4 cells (measured window under 5 s" in note
    assert flags_note([{"flags": ""}, {}]) is None
    for flag in ("gap", "cross_check", "truncated"):
        assert "see docs/metrics.md)" not in flags_note([{"flags": flag}])  # every documented flag has a meaning


def test_unflagged_cells_get_no_caveat(tmp_path):
    paths = SweepPaths.of(tmp_path / "s")
    params = [cell_params(shards=s, power_cap_w=c) for s in (1, 2) for c in (None, 250)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=11.0, warmup_s=1.0, power_w=240.0))  # 10 s windows, caps reached
    assert cli_main(["report", str(paths.root)]) == 0
    for page in ("index.md", "index.html"):
        assert "Flagged cells" not in (paths.report_dir / page).read_text()


# -- help --------------------------------------------------------------------------


@pytest.mark.parametrize("command, statuses", [
    ("reduce", ("0 at least one cell reduced", "1 no done cell", "2 not a sweep folder")),
    ("report", ("0 the report was written", "1 no done cell", "2 not a sweep folder")),
    ("compare", ("0 at least one pair of matching cells", "1 a file could not be read", "2 no matching cells")),
])
def test_help_states_the_exit_statuses(capsys, command, statuses):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: " in text
    tail = text.split("exit status: ")[1]
    assert all(s in tail for s in statuses), tail


def test_a_report_after_more_cells_finished_reduces_again(tmp_path):
    """The counts of cells without a result are read fresh; the figures came from
    the last summary: they said cells had no result that had one."""
    import os

    from orchestrator.contracts import SweepPaths
    from orchestrator.reduce import reduce_sweep
    from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan
    from orchestrator.report.data import load_summary

    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(batch_size=b) for b in (1, 2)]
    write_plan(paths, params)
    write_cell(paths, params[0], CellSpec(seconds=6.0, warmup_s=1.0))
    reduce_sweep(paths.root)
    assert len(load_summary(paths.root)) == 1
    cid = write_cell(paths, params[1], CellSpec(seconds=6.0, warmup_s=1.0))
    later = paths.summary_parquet.stat().st_mtime_ns + 10**9
    os.utime(paths.done_marker(cid), ns=(later, later))
    assert len(load_summary(paths.root)) == 2
