"""`compare`: ratios of matching cells of two sweeps."""
from __future__ import annotations

import pytest

from orchestrator.cli import main as cli_main
from orchestrator.contracts import SweepPaths
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan
from orchestrator.report import CompareError, compare_sweeps


def _sweep(root, kind, power, *, caps=(None,), shards=(1, 2), **over):
    paths = SweepPaths.of(root)
    params = [cell_params(shards=s, power_cap_w=c, gpu_kind=kind, **over) for s in shards for c in caps]
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


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("wattsweep compare: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unmatched_cells_of_each_side_are_counted(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "h100", 400.0)
    b = _sweep(tmp_path / "b", "h200", 300.0, shards=(1, 2, 4))
    t = compare_sweeps(a.root, b.root)
    assert (t.schema.metadata[b"unmatched_a"], t.schema.metadata[b"unmatched_b"]) == (b"0", b"1")
    assert cli_main(["compare", str(a.root), str(b.root)]) == 0
    assert "2 matching cells; unmatched: 0 of A, 1 of B;" in capsys.readouterr().out


def test_damaged_or_empty_plan_is_refused_with_file_and_line(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "v100", 250.0)
    b = _sweep(tmp_path / "b", "v100", 250.0)
    assert cli_main(["compare", str(a.root), str(b.root)]) == 0  # B reduced with its whole plan
    capsys.readouterr()
    b.plan_jsonl.write_text(b.plan_jsonl.read_text()[:-200])  # last line cut short
    assert cli_main(["compare", str(a.root), str(b.root)]) == 2
    assert f"{b.plan_jsonl}:2: malformed plan line" in _err(capsys)
    b.plan_jsonl.write_text("")
    assert cli_main(["compare", str(a.root), str(b.root)]) == 2
    assert f"{b.plan_jsonl}: the plan lists no cells" in _err(capsys)
    (tmp_path / "c").mkdir()
    assert cli_main(["compare", str(a.root), str(tmp_path / "c")]) == 2
    assert "no plan file" in _err(capsys)
    assert list((tmp_path / "c").iterdir()) == []  # no results/ reduced into a folder that is no sweep


def test_unknown_metric_and_ignored_key_name_the_valid_ones(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "v100", 250.0)
    assert cli_main(["compare", str(a.root), str(a.root), "--metrics", "bogus"]) == 2
    assert _err(capsys).startswith("wattsweep compare: unknown metric 'bogus'; valid: shards,")
    assert cli_main(["compare", str(a.root), str(a.root), "--metrics", "cell_id"]) == 2  # not a number
    assert "unknown metric 'cell_id'" in _err(capsys)
    assert cli_main(["compare", str(a.root), str(a.root), "--ignore", "bogus"]) == 2
    assert _err(capsys).startswith("wattsweep compare: unknown key to ignore 'bogus'; valid: model,")


def test_ignore_adds_to_the_default_gpu_kind(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "h100", 400.0, caps=(None,))
    b = _sweep(tmp_path / "b", "h200", 200.0, caps=(150,))
    t = compare_sweeps(a.root, b.root, ignore=["power_cap_w"])  # still not matched on gpu_kind
    assert t.num_rows == 2 and "gpu_kind" not in t.schema.metadata[b"match_on"].decode().split(",")
    assert cli_main(["compare", str(a.root), str(b.root), "--ignore", "power_cap_w"]) == 0
    assert "2 matching cells" in capsys.readouterr().out


def test_no_match_names_the_key_that_differs(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "v100", 250.0, n_prompts=16)
    b = _sweep(tmp_path / "b", "v100", 250.0, n_prompts=8)
    assert cli_main(["compare", str(a.root), str(b.root)]) == 2
    assert _err(capsys) == ("wattsweep compare: no matching cells: no cell of B has n_prompts=16 as in A; "
                            "B has n_prompts=8; pass --ignore n_prompts to pair them")
    assert cli_main(["compare", str(a.root), str(b.root), "--ignore", "n_prompts"]) == 0
    assert "2 matching cells" in capsys.readouterr().out
    with pytest.raises(CompareError, match="leave n_prompts out of --match-on"):
        compare_sweeps(a.root, b.root, match_on=["shards", "n_prompts"])


def test_no_match_names_the_filter_that_left_no_cell(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "v100", 250.0)
    assert cli_main(["compare", str(a.root), str(a.root), "--where-a", "shards=abc"]) == 2
    assert _err(capsys) == ("wattsweep compare: no matching cells: the filter --where-a shards=abc leaves none "
                            "of the 2 cells of A; A has shards=1,2")
    with pytest.raises(CompareError, match="--where-b power_cap_w=150 leaves none .* B has power_cap_w=null"):
        compare_sweeps(a.root, a.root, where_b={"power_cap_w": 150})


def test_flags_of_paired_cells_are_shown_with_their_meaning(tmp_path, capsys):
    """The 2 s windows of these sweeps are short_window: each ratio carries the flag."""
    a = _sweep(tmp_path / "a", "h100", 400.0)
    b = _sweep(tmp_path / "b", "h200", 300.0)
    t = compare_sweeps(a.root, b.root)
    assert t.column("flags").to_pylist() == ["short_window", "short_window"]
    note = t.schema.metadata[b"flags_note"].decode()
    assert note.startswith("Flagged cells, read with care: short_window on 4 of 4 paired cells (measured window under 5 s")
    assert cli_main(["compare", str(a.root), str(b.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"note: {note}"  # under the table, above the count line
    assert out[-1].startswith("2 matching cells")


def test_unflagged_pairs_have_no_note(tmp_path, capsys):
    paths = []
    for name, power in (("a", 400.0), ("b", 300.0)):
        p = SweepPaths.of(tmp_path / name)
        params = [cell_params(shards=1, gpu_kind=name)]
        write_plan(p, params)
        write_cell(p, params[0], CellSpec(seconds=11.0, warmup_s=1.0, power_w=power))
        paths.append(p)
    t = compare_sweeps(paths[0].root, paths[1].root)
    assert t.column("flags").to_pylist() == [""] and t.schema.metadata[b"flags_note"] == b""
    assert cli_main(["compare", str(paths[0].root), str(paths[1].root)]) == 0
    assert "Flagged" not in capsys.readouterr().out


def test_unwritable_csv_exits_1_as_the_help_says(tmp_path, capsys):
    a = _sweep(tmp_path / "a", "h100", 400.0)
    assert cli_main(["compare", str(a.root), str(a.root), "--csv", str(tmp_path / "no" / "r.csv")]) == 1
    assert capsys.readouterr().err.startswith("wattsweep compare: ")
