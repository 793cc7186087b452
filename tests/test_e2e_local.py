"""The whole path on the embedded default: plan → local jobs → sharded workers →
Parquet → reduce, with the real worker on CPU and the simulated GPU backend."""
import json
import math

import pyarrow.parquet as pq
import pytest

from orchestrator.cli import main
from orchestrator.contracts import SweepPaths
from orchestrator.plan import read_plan

TINY = ["n_prompts=4", "max_new_tokens=4", "max_prompt_tokens=16", "gpu=simulated"]


def _sweep(tmp_path, monkeypatch, *overrides, status=0):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WATTSWEEP_STATE_DIR", str(tmp_path / "state"))
    assert main(["sweep", "-m", "sweep_dir=out", *TINY, *overrides, "--wait"]) == status
    return SweepPaths.of(tmp_path / "out")


@pytest.mark.slow
def test_two_by_two_sweep_reduces_to_numbers_that_hold_together(tmp_path, monkeypatch, capsys):
    paths = _sweep(tmp_path, monkeypatch, "shards=1,2", "batch_size=1,2")
    out = capsys.readouterr().out
    assert "sweep folder:" in out and "simulated" in out
    rows = pq.read_table(paths.summary_parquet).to_pylist()
    assert len(rows) == 4
    for r in rows:
        assert r["telemetry_source"] == "simulated" and r["weights"] == "random"
        assert r["n_responses"] == 4 and r["output_tokens"] == 4 * 4  # random weights: exactly max_new_tokens
        assert math.isclose(r["tokens_per_s"] * r["duration_s"], r["output_tokens"], rel_tol=1e-6)
        assert math.isclose(r["mean_power_w"] * r["duration_s"], r["energy_j"], rel_tol=1e-6)
        assert math.isclose(r["energy_per_token_j"] * r["output_tokens"], r["energy_j"], rel_tol=1e-6)
        assert r["energy_j"] > 0
    for cell in read_plan(paths):  # DONE.json counts the prompts cut to max_prompt_tokens
        assert 0 <= json.loads(paths.done_marker(cell.cell_id).read_text())["prompts_truncated"] <= 4
    by_shards = {r["shards"] for r in rows}
    assert by_shards == {1, 2}
    for cell in read_plan(paths):
        done = json.loads(paths.done_marker(cell.cell_id).read_text())
        assert done["world_size"] == cell.params.shards
        assert done["rendezvous"] == ("published" if cell.params.shards > 1 else "single")
        assert sorted(done["files"]) == sorted(
            [f"telemetry/rank-{r}.parquet" for r in range(cell.params.shards)] + ["requests/rank-0.parquet"]
        )
        assert paths.caps_ledger(cell.cell_id).exists() or cell.params.power_cap_w is None


@pytest.mark.slow
def test_a_raising_rank_fails_its_cell_with_the_traceback_and_the_others_finish(tmp_path, monkeypatch, capsys):
    """--wait exits 1 when a cell gave no result, and says what to run next."""
    paths = _sweep(tmp_path, monkeypatch, "shards=1,2", "fail_on_purpose=raise-rank-1", status=1)
    err = capsys.readouterr().err
    assert "1 of 2 cell(s) gave no valid result (0 cancelled, 0 timed out, 1 failed or missing, 0 invalid)" in err
    assert f"wattsweep resubmit {paths.root}" in err
    assert "failed: RuntimeError: worker raised on purpose (fail_on_purpose=raise-rank-1)" in err  # the reason, at once
    cells = {c.params.shards: c.cell_id for c in read_plan(paths)}
    failed = json.loads(paths.failed_marker(cells[2]).read_text())
    assert "raised on purpose" in failed["error"] and "Traceback" in failed["traceback"]
    assert failed["rank"] == 1  # the cause, not the peer that lost its connection
    assert paths.done_marker(cells[1]).exists() and not paths.done_marker(cells[2]).exists()


@pytest.mark.slow
def test_a_rank_killed_outright_is_named_not_the_peer_that_saw_it_go(tmp_path, monkeypatch, capsys):
    """A rank ended by SIGKILL (the out-of-memory killer) writes nothing; the rank
    that saw it go wrote FAILED.json with its gloo error. Status and logs used to
    show only that error: they now name the killed rank and show its log."""
    paths = _sweep(tmp_path, monkeypatch, "shards=2", "fail_on_purpose=kill-rank-1", status=1)
    assert "failed: rank 1 was killed" in capsys.readouterr().err  # --wait says so at once
    (cell,) = read_plan(paths)
    failed = json.loads(paths.failed_marker(cell.cell_id).read_text())
    assert failed["rank"] == 0 and "another rank probably ended first" in failed["error"]
    capsys.readouterr()
    assert main(["status", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert "rank 1 was killed (log stops without an error: out of memory, or the node?)" in out
    assert "Rank 0 saw: " in out
    assert main(["logs", str(paths.root), cell.cell_id]) == 0
    captured = capsys.readouterr()
    assert "rank 1's log stops without an error or an end: it was killed" in captured.err
    assert "_1_log.out <==" in captured.out  # rank 1's own log, not rank 0's


@pytest.mark.slow
def test_capped_cell_applies_and_restores_on_the_simulated_card(tmp_path, monkeypatch):
    paths = _sweep(tmp_path, monkeypatch, "power_cap_w=150")
    (cell,) = read_plan(paths)
    ledger = [json.loads(line) for line in paths.caps_ledger(cell.cell_id).read_text().splitlines()]
    assert [(r["action"], r["result"]) for r in ledger] == [("apply", "ok"), ("restore", "ok")]
    assert ledger[0]["requested_w"] == 150 and ledger[0]["enforced_w"] == 150
    assert ledger[1]["enforced_w"] == ledger[0]["previous_w"]
    row = pq.read_table(paths.summary_parquet).to_pylist()[0]
    assert row["power_cap_w"] == 150


@pytest.mark.slow
def test_eight_ranks_on_one_machine(tmp_path, monkeypatch):
    """The 8-GPU path (one rank per GPU, model parallel over 8) on CPU ranks."""
    paths = _sweep(tmp_path, monkeypatch, "shards=8", "model.n_heads=8", "model.dim=128", "batch_size=2",
                   "n_prompts=2", "max_new_tokens=2")
    (cell,) = read_plan(paths)
    done = json.loads(paths.done_marker(cell.cell_id).read_text())
    assert done["world_size"] == 8 and done["rendezvous"] == "published"
    assert len(list(paths.cell_dir(cell.cell_id).glob("telemetry/rank-*.parquet"))) == 8
    assert pq.read_table(paths.summary_parquet).num_rows == 1


@pytest.mark.slow
def test_ctrl_c_while_waiting_stops_the_wait_not_the_cells(tmp_path, monkeypatch, capsys):
    """Ctrl-C on `sweep --wait` printed only "interrupted": the cells ran on unseen."""
    from orchestrator.submit.local import LocalLauncher

    real_wait = LocalLauncher.wait

    def interrupted(self, paths, records):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalLauncher, "wait", interrupted)
    paths = _sweep(tmp_path, monkeypatch, status=130)
    err = capsys.readouterr().err
    assert "stopped waiting; the cells run on" in err and f"`wattsweep status {paths.root} --watch`" in err
    monkeypatch.setattr(LocalLauncher, "wait", real_wait)
    from orchestrator.submit.base import read_submissions

    LocalLauncher({"max_parallel": 1}).wait(paths, read_submissions(paths))  # they do finish
    assert all(paths.done_marker(c.cell_id).exists() for c in read_plan(paths))


def test_two_sweeps_in_one_second_get_two_default_folders(tmp_path, monkeypatch):
    """The default folder is named by the second: the second sweep of that second failed
    with "already holds a sweep" on a name its user never gave."""
    from orchestrator.submit import sweep_cmd
    from orchestrator.config import compose_cells

    monkeypatch.chdir(tmp_path)
    first = compose_cells(["gpu=simulated"], False)
    assert not first.sweep_dir_given
    assert compose_cells(["n_prompts=4", "sweep_dir=x"], False).sweep_dir_given
    a = sweep_cmd._fresh_default_folder(first)
    b = sweep_cmd._fresh_default_folder(first)  # the same second's name again
    assert a.sweep_dir == first.sweep_dir and b.sweep_dir == first.sweep_dir.with_name(first.sweep_dir.name + "-2")
    assert a.sweep_dir.is_dir() and b.sweep_dir.is_dir()
    if "sweep_dir" in b.config:
        assert b.config["sweep_dir"] == str(b.sweep_dir)
