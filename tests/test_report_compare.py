"""`compare`: ratios of matching cells of two sweeps."""
from __future__ import annotations

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import SweepPaths
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan
from orchestrator.report import CompareError, compare_sweeps


def _sweep(root, kind, power, *, caps=(None,), shards=(1, 2)):
    paths = SweepPaths.of(root)
    params = [cell_params(shards=s, power_cap_w=c, gpu_kind=kind) for s in shards for c in caps]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0, power_w=power))
    return paths


def test_ratios_of_matching_cells_across_gpu_kinds(tmp_path):
    a = _sweep(tmp_path / "a", "h100", 400.0)
    b = _sweep(tmp_path / "b", "h200", 300.0, shards=(1, 2, 4))
    t = compare_sweeps(a.root, b.root)
    assert t.num_rows == 2  # shards=4 exists only in B
    assert t.column("shards").to_pylist() == [1, 2]
    assert t.column("energy_per_token_j_ratio").to_pylist() == pytest.approx([0.75, 0.75])
    assert t.column("tokens_per_s_ratio").to_pylist() == pytest.approx([1.0, 1.0])
    assert t.schema.metadata[b"simulated"] == b"A,B"


def test_match_on_chosen_keys_compares_caps(tmp_path):
    a = _sweep(tmp_path / "a", "v100", 250.0, caps=(None,))
    b = _sweep(tmp_path / "b", "v100", 150.0, caps=(150,))
    with pytest.raises(CompareError, match="no matching cells"):
        compare_sweeps(a.root, b.root)
    t = compare_sweeps(a.root, b.root, ignore=["power_cap_w"])
    assert t.column("mean_power_w_ratio").to_pylist() == pytest.approx([0.6, 0.6])
    t2 = compare_sweeps(a.root, b.root, match_on=["model", "shards"])
    assert t2.num_rows == 2


def test_ambiguous_and_unknown_keys_are_one_line_errors(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "v100", 250.0, caps=(None, 150))
    with pytest.raises(CompareError, match="match on the same keys"):
        compare_sweeps(a.root, a.root, match_on=["shards"])
    assert cli_main(["compare", str(a.root), str(a.root), "--match-on", "shard"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wattsweep compare: unknown match key 'shard'; valid: model,") and "\n" not in err


def test_cli_prints_ratios_and_writes_csv(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "h100", 400.0)
    b = _sweep(tmp_path / "b", "h200", 200.0)
    assert cli_main(["compare", str(a.root), str(b.root), "--csv", str(tmp_path / "r.csv")]) == 0
    out = capsys.readouterr().out
    assert "simulated telemetry in sweep A,B" in out and "2 matching cells" in out
    assert (tmp_path / "r.csv").read_text().count("\n") == 3


def test_one_sweep_cap_against_uncapped_with_filters(tmp_path, capsys):
    paths = SweepPaths.of(tmp_path / "s")
    params = [cell_params(shards=s, power_cap_w=c) for s in (1, 2) for c in (None, 150)]
    write_plan(paths, params)
    for p in params:
        write_cell(paths, p, CellSpec(seconds=3.0, warmup_s=1.0, power_w=200.0 if p["power_cap_w"] is None else 150.0))
    t = compare_sweeps(paths.root, paths.root, ignore=["power_cap_w"],
                       where_a={"power_cap_w": None}, where_b={"power_cap_w": 150})
    assert t.column("shards").to_pylist() == [1, 2]
    assert t.column("energy_per_token_j_ratio").to_pylist() == pytest.approx([0.75, 0.75])
    assert cli_main(["compare", str(paths.root), str(paths.root), "--ignore", "power_cap_w",
                     "--where-a", "power_cap_w=null", "--where-b", "power_cap_w=150"]) == 0
    assert "2 matching cells" in capsys.readouterr().out
    assert cli_main(["compare", str(paths.root), str(paths.root), "--where-a", "cap"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
