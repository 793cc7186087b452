"""plan.jsonl and sweep.yaml."""
from __future__ import annotations

import json

import pytest

from orchestrator.config import compose_cells
from orchestrator.contracts import SweepPaths
from orchestrator.plan import PlanFileError, plan_cells, read_plan, read_sweep_yaml, write_plan, write_sweep_yaml


@pytest.fixture()
def planned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = compose_cells(["shards=1,3", "batch_size=1,4", "sweep_dir=out"], multirun=True)
    return sweep, plan_cells(sweep), SweepPaths.of(sweep.sweep_dir)


def test_round_trip(planned):
    _, cells, paths = planned
    write_plan(paths, cells)
    assert read_plan(paths) == cells
    lines = paths.plan_jsonl.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert set(first) == {"id", "params", "options", "launcher", "nodes", "feasible", "reason"}


def test_malformed_line_names_file_and_line(planned):
    _, cells, paths = planned
    write_plan(paths, cells)
    lines = paths.plan_jsonl.read_text().splitlines()
    lines[2] = lines[2][:40]
    paths.plan_jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(PlanFileError, match=r"plan.jsonl:3: malformed plan line"):
        read_plan(paths)


def test_edited_params_do_not_match_id(planned):
    _, cells, paths = planned
    write_plan(paths, cells)
    lines = paths.plan_jsonl.read_text().splitlines()
    d = json.loads(lines[1])
    d["params"]["batch_size"] = 99
    lines[1] = json.dumps(d)
    paths.plan_jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(PlanFileError, match=r":2: .*does not match its params"):
        read_plan(paths)


def test_missing_plan(tmp_path):
    with pytest.raises(PlanFileError, match="no plan file"):
        read_plan(SweepPaths.of(tmp_path))


def test_sweep_yaml(planned):
    sweep, cells, paths = planned
    write_sweep_yaml(paths, sweep, len(cells), sum(c.feasible for c in cells))
    record = read_sweep_yaml(paths)
    assert record["overrides"] == ["shards=1,3", "batch_size=1,4", "sweep_dir=out"]
    assert record["cells"] == {"planned": 4, "feasible": 2, "infeasible": 2}
    assert record["config"]["model"]["name"] == "llama-tiny"
    assert record["user"] and record["host"] and record["tool_version"]
