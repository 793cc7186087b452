"""Ranks of a multi-rank job find rank 0 through a file in the cell folder,
on a port the system picked, never on the job-seeded port another job may hold."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from workers import dist as wdist

# One rank of a two-rank "submitit" job whose job-seeded port is PORT.
RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from pathlib import Path
from workers import dist as wdist
rank, port, published = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
wdist._from_submitit = lambda: wdist._Rendezvous(rank, 2, rank, 2, "127.0.0.1", port, "submitit")
info = wdist.init_distributed(2, timeout_s=60, rendezvous=published)
t = torch.tensor([rank + 1.0])
dist.all_reduce(t)
print("SUM", int(t.item()), info.world_size, flush=True)
wdist.shutdown()
"""


@pytest.mark.slow
def test_two_ranks_join_through_the_published_file_when_the_seeded_port_is_taken(tmp_path):
    """Before, rank 0 listened on the job-seeded port: another job holding it
    failed the cell with EADDRINUSE."""
    published = tmp_path / "launch" / "rendezvous-77.0.a0.json"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # rank 1 first: it must wait for rank 0's file, not fail on its absence
        procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(r), str(port), str(published)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (1, 0)]
        outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "SUM 3 2" in out
    assert not published.exists()  # rank 0 removes it once every rank has joined


def _write_later(path, obj, delay_s):
    def write():
        time.sleep(delay_s)
        path.write_text(json.dumps(obj))
    t = threading.Thread(target=write)
    t.start()
    return t


def test_a_waiting_rank_reads_the_address_once_rank_0_writes_it(tmp_path):
    published = tmp_path / "rendezvous-5.0.a0.json"
    t = _write_later(published, {"addr": "n1", "port": 41234}, 0.3)
    assert wdist.wait_for_address(published, timeout_s=10, poll_s=0.05) == ("n1", 41234)
    t.join()


def _attempt_failed(paths, attempt):
    """What run_cell gives the wait: this attempt's FAILED.json of cell c1."""
    from types import SimpleNamespace

    from workers.markers import failure_reason

    task = SimpleNamespace(cell_id="c1", attempt=attempt)
    return lambda: failure_reason(paths, task)


def test_a_waiting_rank_stops_when_rank_0_fails_first(tmp_path):
    from orchestrator.contracts import SweepPaths

    paths = SweepPaths.of(tmp_path)
    published = tmp_path / "rendezvous-5.0.a0.json"
    paths.cell_dir("c1").mkdir(parents=True)
    t = _write_later(paths.failed_marker("c1"), {"error": "boom", "rank": 0, "attempt": 0}, 0.2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 failed before it published its address \(rank 0: boom\)"):
        wdist.wait_for_address(published, timeout_s=30, abort_if=_attempt_failed(paths, 0), poll_s=0.05)
    assert time.monotonic() - t0 < 5
    t.join()


def test_a_failed_marker_written_long_before_the_wait_still_stops_it(tmp_path):
    """The wait used to heed only a FAILED.json written after it began: a rank that
    started late waited out its timeout beside rank 0's marker."""
    from orchestrator.contracts import SweepPaths

    paths = SweepPaths.of(tmp_path)
    paths.cell_dir("c1").mkdir(parents=True)
    paths.failed_marker("c1").write_text(json.dumps({"error": "boom", "rank": 0, "attempt": 2}))
    old = time.time() - 3600
    os.utime(paths.failed_marker("c1"), (old, old))
    with pytest.raises(RuntimeError, match="rank 0 failed before it published"):
        wdist.wait_for_address(tmp_path / "rendezvous-5.0.a2.json", timeout_s=10, abort_if=_attempt_failed(paths, 2))


def test_an_earlier_attempts_failed_marker_does_not_stop_the_wait(tmp_path):
    from orchestrator.contracts import SweepPaths

    paths = SweepPaths.of(tmp_path)
    paths.cell_dir("c1").mkdir(parents=True)
    paths.failed_marker("c1").write_text(json.dumps({"error": "old", "rank": 1, "attempt": 0}))
    published = tmp_path / "rendezvous-5.0.a1.json"
    t = _write_later(published, {"addr": "n1", "port": 5}, 0.3)
    assert wdist.wait_for_address(published, timeout_s=10, abort_if=_attempt_failed(paths, 1), poll_s=0.05) == ("n1", 5)
    t.join()


def test_a_requeued_runs_ranks_do_not_stop_at_the_first_runs_marker(tmp_path, monkeypatch):
    """Preempted, a job is requeued with the same attempt; its first run wrote
    FAILED.json on the way out (submitit's requeue exits). Judged by attempt
    alone, that marker stopped the requeued run's ranks before rank 0 could
    move it aside."""
    from orchestrator.contracts import SweepPaths
    from workers import markers

    paths = SweepPaths.of(tmp_path)
    paths.cell_dir("c1").mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued run
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    markers.run_id.cache_clear()  # the run is read once per process: read it from this environment
    try:
        marker = {"error": "SystemExit: -1", "rank": 0, "attempt": 0, "run": "4711.0"}
        paths.failed_marker("c1").write_text(json.dumps(marker))
        assert _attempt_failed(paths, 0)() is None
        paths.failed_marker("c1").write_text(json.dumps({**marker, "run": "4711.1"}))  # this run's own
        assert _attempt_failed(paths, 0)() == "rank 0: SystemExit: -1"
        paths.failed_marker("c1").write_text(json.dumps({k: v for k, v in marker.items() if k != "run"}))
        assert _attempt_failed(paths, 0)() == "rank 0: SystemExit: -1"  # the local runner's marker has no run
    finally:
        markers.run_id.cache_clear()


def test_a_requeued_run_that_fails_keeps_the_first_runs_marker(tmp_path, monkeypatch):
    """Its marker went over the first run's (which rank 0 had not moved aside yet)."""
    from types import SimpleNamespace

    from orchestrator.contracts import SweepPaths
    from workers import markers

    paths = SweepPaths.of(tmp_path)
    paths.cell_dir("c1").mkdir(parents=True)
    monkeypatch.setattr(markers, "run_id", lambda: "4711.1")
    first = {"error": "SystemExit: -1", "rank": 0, "attempt": 0, "run": "4711.0"}
    paths.failed_marker("c1").write_text(json.dumps(first))
    task = SimpleNamespace(cell_id="c1", attempt=0)
    markers.write_failure(paths, task, 1, error="boom", traceback_text="")
    assert json.loads((paths.attempts_dir("c1") / "0" / "FAILED.json").read_text()) == first
    now = json.loads(paths.failed_marker("c1").read_text())
    assert (now["error"], now["rank"], now["run"]) == ("boom", 1, "4711.1")


def test_failed_json_names_the_rank_that_failed_to_join(monkeypatch):
    """A rank that failed while joining was recorded as rank 0."""
    monkeypatch.setattr(wdist, "_from_submitit", lambda: wdist._Rendezvous(1, 2, 1, 2, "127.0.0.1", 1, "submitit"))
    assert wdist.own_rank() == 1


def test_the_wait_times_out_naming_the_file_and_rank_0s_logs(tmp_path):
    published = tmp_path / "rendezvous-5.0.a0.json"
    with pytest.raises(RuntimeError, match=r"did not publish its address in .*rendezvous-5.0.a0.json within 0 s.*--rank 0"):
        wdist.wait_for_address(published, timeout_s=0.2, poll_s=0.05)


def test_an_unreadable_file_is_named(tmp_path):
    published = tmp_path / "rendezvous-5.0.a0.json"
    published.write_text('{"addr": "n1"}')
    with pytest.raises(RuntimeError, match="not readable .*resubmit"):
        wdist.wait_for_address(published, timeout_s=1)


def test_job_key_names_the_slurm_job_and_its_restart(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert wdist.job_key() == "4711.2"
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    assert wdist.job_key() == "4711.0"
    monkeypatch.delenv("SLURM_JOB_ID")
    for k in ("SUBMITIT_EXECUTOR", "SUBMITIT_LOCAL_JOB_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert wdist.job_key() == f"pid{os.getpid()}.0"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    assert wdist.job_key() == "envn1-29512.0"  # the same on every rank (not each one's pid)


def test_a_local_run_inside_an_allocation_is_named_by_its_local_job(monkeypatch):
    """Started from an `salloc` shell, every local run saw the allocation's
    SLURM_JOB_ID: rendezvous and heartbeat folders of runs of one attempt collided."""
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "31337")
    assert wdist.job_key() == "local31337.0"


def test_rank_0_removes_the_file_only_once_the_others_have_connected(tmp_path):
    """With NCCL, init_process_group returns before the other ranks join: rank 0
    removed the file at once, and a rank that started later waited out its
    timeout (seen on two H200s). Here rank 1 starts a second after rank 0."""
    published = tmp_path / "rendezvous-9.0.a0.json"
    rank0 = wdist._Rendezvous(0, 2, 0, 2, "127.0.0.1", 1, "submitit")
    rank1 = wdist._Rendezvous(1, 2, 1, 2, "127.0.0.1", 1, "submitit")
    store0 = wdist._published_store(rank0, published, 30, None)
    joined = {}

    def late_rank():
        time.sleep(1.0)
        joined["store"] = wdist._published_store(rank1, published, 30, None)

    t = threading.Thread(target=late_rank)
    t.start()
    assert published.exists()
    wdist.remove_when_joined(store0, published, 2, timeout_s=30)
    assert not published.exists() and "store" in joined  # removed after rank 1 had read it
    t.join()
    joined["store"].set("k", "v")
    assert store0.get("k") == b"v"


def test_rank_0_names_how_many_ranks_never_connected(tmp_path):
    published = tmp_path / "rendezvous-9.0.a0.json"
    store0 = wdist._published_store(wdist._Rendezvous(0, 3, 0, 3, "127.0.0.1", 1, "submitit"), published, 30, None)
    with pytest.raises(RuntimeError, match="0 of the 2 other ranks connected within 0 s"):
        wdist.remove_when_joined(store0, published, 3, timeout_s=0.2)
