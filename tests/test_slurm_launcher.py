"""The Slurm launcher's pure parts: resources, arrays, sbatch text (no cluster)."""
from __future__ import annotations

import pytest

from orchestrator.submit.base import LaunchError
from orchestrator.submit.slurm import (
    SlurmLauncher,
    parse_sbatch_extra,
    render_sbatch,
    resources_for,
    sbatch_parameters,
)
from orchestrator.status.slurm_queue import _elapsed_s, expand_job_ids
from tests.test_status_state import make_cell

CFG = {"gpus_per_node": 4, "cpus_per_gpu": 2, "mem_per_gpu_gb": 10, "time_min": 30, "gres": None}


@pytest.mark.parametrize(
    "shards, gpn, nodes, tpn",
    [(1, 4, 1, 1), (4, 4, 1, 4), (5, 4, 2, 4), (8, 4, 2, 4), (2, 1, 2, 1), (3, 8, 1, 3)],
)
def test_nodes_and_tasks_follow_the_gpus(shards, gpn, nodes, tpn):
    res = resources_for(shards, {**CFG, "gpus_per_node": gpn})
    assert (res.nodes, res.tasks_per_node) == (nodes, tpn)
    assert res.gres == f"gpu:{tpn}" and res.mem_gb == 10 * tpn and res.cpus_per_task == 2


@pytest.mark.parametrize("gres, want", [(None, "gpu:2"), ("", None), ("none", None), ("gpu:v100", "gpu:v100:2"), ("gpu:v100:8", "gpu:v100:8")])
def test_gres_rules(gres, want):
    assert resources_for(2, {**CFG, "gres": gres}).gres == want


def test_sbatch_extra_lines():
    assert parse_sbatch_extra(("#SBATCH --mail-type=END", "--exclusive", " --comment = x ")) == {
        "mail-type": "END", "exclusive": True, "comment": "x"}
    with pytest.raises(LaunchError, match="expected a long option"):
        parse_sbatch_extra(("-p gpu",))


def test_rendered_script_has_every_setting(tmp_path):
    cfg = {**CFG, "partition": "gpu", "account": "proj", "qos": "high", "constraint": "a100", "exclude": "n9",
           "setup": ["module load cuda", "echo hi"], "sbatch_extra": ["--mail-type=END"], "array_parallelism": 3}
    text = render_sbatch(tmp_path, resources_for(6, cfg), "ws-x", 10)
    for line in ["--array=0-9%3", "--nodes=2", "--ntasks-per-node=4", "--gres=gpu:4", "--partition=gpu",
                 "--account=proj", "--qos=high", "--constraint=a100", "--exclude=n9", "--mem=40GB",
                 "--time=30", "--mail-type=END", "--cpus-per-task=2", "module load cuda\necho hi"]:
        assert line in text, line
    assert "--array" not in render_sbatch(tmp_path, resources_for(1, cfg), "ws-x", 1)


def test_no_gpu_request_when_gres_is_empty():
    params = sbatch_parameters(resources_for(2, {**CFG, "gres": "", "mem_per_gpu_gb": None}), "j")
    assert "gres" not in params and "mem" not in params


def test_cells_grouped_by_resources_and_split_below_max_array():
    cells = [make_cell(batch_size=b, shards=s) for s in (1, 2) for b in range(1, 6)]
    cells.append(make_cell(batch_size=99, feasible=False))
    chunks = SlurmLauncher({**CFG, "gpus_per_node": 1}).chunks(cells, max_array=2)
    assert [len(c.cells) for c in chunks] == [2, 2, 1, 2, 2, 1]
    assert [c.res.nodes for c in chunks] == [1, 1, 1, 2, 2, 2]
    assert sum(len(c.cells) for c in chunks) == 10  # the infeasible cell is not launched


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    from orchestrator.contracts import SweepPaths

    cells = [make_cell(batch_size=b) for b in (1, 2)]
    assert SlurmLauncher(CFG).submit(SweepPaths.of(tmp_path / "s"), cells, dry_run=True) == []
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-1%2" in out and cells[0].cell_id in out
    assert not (tmp_path / "s").exists()


def test_job_id_ranges_and_times():
    assert expand_job_ids("12_[0-2,7%2]") == ["12_0", "12_1", "12_2", "12_7"]
    assert expand_job_ids("12_3") == ["12_3"] and expand_job_ids("12") == ["12"]
    assert _elapsed_s("1-02:03:04") == 93784 and _elapsed_s("03:04") == 184 and _elapsed_s("") is None


def test_a_refused_array_marks_its_cells_failed_and_keeps_what_was_queued(tmp_path, monkeypatch):
    """sbatch refuses one array (say, more nodes than the cluster has): the
    others are queued, and the refused cells carry the reason in the sweep
    folder, where status shows it and resubmit retries them."""
    from orchestrator.contracts import SweepPaths, read_json
    from orchestrator.submit import slurm
    from orchestrator.submit.base import SubmissionRecord, read_submissions
    from orchestrator.submit.shell import SlurmCommandError

    paths = SweepPaths.of(tmp_path / "s")
    cells = [make_cell(batch_size=1, shards=1), make_cell(batch_size=1, shards=8)]

    def fake_chunk(self, paths, folder, job_name, ch):
        if ch.res.nodes > 1:
            folder.mkdir(parents=True, exist_ok=True)  # what submitit leaves when sbatch refuses
            (folder / "0b1c_submitted.pkl").write_bytes(b"")
            (folder / ".submission_file_0b1c.sh").write_text("")
            raise SlurmCommandError(["sbatch"], "sbatch: error: Node count specification invalid")
        return SubmissionRecord(tuple(c.cell_id for c in ch.cells), "slurm", ("41_0",), True, 1.0, 0,
                                {"array_job_id": "41"})

    monkeypatch.setattr(slurm.SlurmLauncher, "_submit_chunk", fake_chunk)
    with pytest.raises(LaunchError, match="Node count specification invalid") as e:
        SlurmLauncher({**CFG, "gpus_per_node": 4}).submit(paths, cells)
    assert [r.cell_ids for r in e.value.records] == [(cells[0].cell_id,)]
    assert [r.cell_ids for r in read_submissions(paths)] == [(cells[0].cell_id,)]
    failed = read_json(paths.failed_marker(cells[1].cell_id))
    assert failed["error"].startswith("sbatch refused the job (2 node(s)") and "Node count" in failed["error"]
    assert not paths.failed_marker(cells[0].cell_id).exists()
    assert not [p for p in (paths.root / "launch").iterdir() if p.is_file()]  # the refused array's files are gone
