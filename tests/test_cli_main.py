"""What every subcommand shares: a closed pipe ends it quietly, a file it
cannot read or write is one line naming the file, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator import cli
from orchestrator.reduce.synthetic import CellSpec, cell_params, write_cell, write_plan
from orchestrator.contracts import SweepPaths


def _fail_with(monkeypatch, exc: BaseException) -> None:
    import orchestrator.status.cmd as status_cmd

    def run(args):
        raise exc

    monkeypatch.setattr(status_cmd, "run", run)


def test_a_file_the_command_cannot_write_is_one_line(monkeypatch, capsys, tmp_path):
    _fail_with(monkeypatch, PermissionError(13, "Permission denied", str(tmp_path / "results")))
    assert cli.main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"wattsweep status: Permission denied: {tmp_path / 'results'} (WATTSWEEP_TRACEBACK=1 shows where)\n"


def test_the_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("WATTSWEEP_TRACEBACK", "1")
    _fail_with(monkeypatch, PermissionError(13, "Permission denied", "x"))
    with pytest.raises(PermissionError):
        cli.main(["status", str(tmp_path)])


def test_sweep_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    assert cli.main(["sweep", "sweep_dir=afile"]) == 1
    assert f"File exists: {tmp_path / 'afile'}" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`wattsweep status DIR | head`: the reader may close before the command
    writes (here it closes at once, long before Python has started)."""
    paths = SweepPaths.of(tmp_path / "sweep")
    params = [cell_params(shards=1, seed=i) for i in range(20)]
    write_plan(paths, params)
    for p in params[:3]:
        write_cell(paths, p, CellSpec(seconds=1.0, warmup_s=0.2))
    cmd = f"{sys.executable} -m orchestrator.cli status {paths.root} | true; echo rc=${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.stdout.strip() == "rc=141", done.stdout
