"""`reduce`, `report` and `compare` refuse what is not a sweep, a damaged plan and
unknown names: one line on stderr, exit 2, nothing written into the folder."""
from __future__ import annotations

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import SweepPaths
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan

SPEC = CellSpec(seconds=3.0, warmup_s=1.0)


def _sweep(root, n=2):
    paths = SweepPaths.of(root)
    params = [cell_params(seed=i) for i in range(n)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, SPEC)
    return paths


def _one_line_err(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wattsweep {command}: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", ["reduce", "report"])
def test_folder_without_plan_is_refused_and_left_untouched(tmp_path, capsys, command):
    root = tmp_path / "notasweep"
    root.mkdir()
    assert cli_main([command, str(root)]) == 2
    err = _one_line_err(capsys, command)
    assert f"{root / 'plan.jsonl'}: no plan file" in err and "made by `wattsweep sweep`" in err
    assert list(root.iterdir()) == []  # no results/ or report/ made in it


def _truncate_last_line(paths):
    text = paths.plan_jsonl.read_text()
    paths.plan_jsonl.write_text(text[:-200])


@pytest.mark.parametrize("command", ["reduce", "report"])
def test_damaged_plan_is_refused_with_file_and_line(tmp_path, capsys, command):
    paths = _sweep(tmp_path / "s")
    _truncate_last_line(paths)
    assert cli_main([command, str(paths.root)]) == 2
    err = _one_line_err(capsys, command)
    assert f"{paths.plan_jsonl}:2: malformed plan line" in err
    assert not paths.results_dir.exists() and not paths.report_dir.exists()


def test_non_json_and_empty_plans_are_refused(tmp_path, capsys):
    paths = _sweep(tmp_path / "s")
    lines = paths.plan_jsonl.read_text().splitlines()
    paths.plan_jsonl.write_text(lines[0] + "\nnot json\n")
    assert cli_main(["reduce", str(paths.root)]) == 2
    assert f"{paths.plan_jsonl}:2: malformed plan line" in _one_line_err(capsys, "reduce")
    paths.plan_jsonl.write_text("")
    assert cli_main(["reduce", str(paths.root)]) == 2
    assert f"{paths.plan_jsonl}: the plan lists no cells" in _one_line_err(capsys, "reduce")


def test_unknown_column_names_the_valid_ones(tmp_path, capsys):
    paths = _sweep(tmp_path / "s")
    assert cli_main(["reduce", str(paths.root), "--columns", "cell_id,bogus"]) == 2
    err = _one_line_err(capsys, "reduce")
    assert err.startswith("wattsweep reduce: unknown column 'bogus'; valid: cell_id, model,")
    assert not paths.results_dir.exists()  # refused before reducing
    assert cli_main(["reduce", str(paths.root), "--columns", "cell_id,energy_j"]) == 0
