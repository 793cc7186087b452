"""`wattsweep sweep` with the local launcher: returns at once; the cells finish
after the command has exited (the runner is detached)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from orchestrator.contracts import SweepPaths
from orchestrator.plan import read_plan


def test_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "-m", "--dry-run", "shards=1,3", "sweep_dir=out"]) == 0
    out = capsys.readouterr().out
    assert "infeasible: shards=3 does not divide n_heads=4" in out
    assert "would run cell" in out
    assert not (tmp_path / "out").exists()


def test_a_sweep_of_only_infeasible_cells_launches_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "shards=3", "sweep_dir=out"]) == 2
    captured = capsys.readouterr()
    assert "infeasible: shards=3 does not divide n_heads=4" in captured.out
    assert "every cell is infeasible (reasons above); nothing was launched" in captured.err


def test_existing_sweep_folder_is_refused(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "plan.jsonl").write_text("")
    assert main(["sweep", "sweep_dir=out"]) == 2
    assert "already holds a sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_cells_finish_after_the_command_exits(tmp_path):
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "-m", "sweep_dir=out", "shards=1,3",
           "n_prompts=2", "max_new_tokens=2", "max_prompt_tokens=8", "dtype=float32", "gpu=simulated"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "sweep folder:" in done.stdout and "queued (job" in done.stdout and "infeasible" in done.stdout
    paths = SweepPaths.of(tmp_path / "out")
    cells = read_plan(paths)
    cid = next(c.cell_id for c in cells if c.feasible)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (paths.done_marker(cid).exists() or paths.failed_marker(cid).exists()):
        time.sleep(0.25)
    failed = paths.failed_marker(cid)
    assert paths.done_marker(cid).exists(), failed.read_text() if failed.exists() else "no marker"
    assert json.loads(paths.submissions_jsonl.read_text().splitlines()[0])["cell_ids"] == [cid]
    assert paths.sweep_yaml.exists()
