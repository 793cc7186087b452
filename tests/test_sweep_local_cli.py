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
from conftest import SHARED_DATA


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


@pytest.mark.slow
def test_a_relative_dataset_path_still_works_when_resubmitted_from_another_folder(tmp_path):
    """Workers open the file the plan resolved, not the path as written: the job
    of a resubmit started elsewhere looked for data/... under its own folder."""
    gsm8k = SHARED_DATA / "gsm8k" / "train.jsonl"
    if not gsm8k.exists():
        pytest.skip(f"needs {gsm8k}")
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    (here / "data").mkdir(parents=True)
    elsewhere.mkdir()
    (here / "data" / "train.jsonl").symlink_to(gsm8k)
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "sweep_dir=out", "dataset=gsm8k",
           "dataset.path=data/train.jsonl", "n_prompts=2", "max_new_tokens=2", "max_prompt_tokens=64",
           "dtype=float32", "gpu=simulated", "--wait"]
    done = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    again = subprocess.run([sys.executable, "-m", "orchestrator.cli", "resubmit", str(here / "out"), "--force"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    paths = SweepPaths.of(here / "out")
    (cell,) = read_plan(paths)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not paths.done_marker(cell.cell_id).exists():
        failed = paths.failed_marker(cell.cell_id)
        assert not failed.exists(), failed.read_text()
        time.sleep(0.25)
    assert json.loads(paths.done_marker(cell.cell_id).read_text())["attempt"] == 1
