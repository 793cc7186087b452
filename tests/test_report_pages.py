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
