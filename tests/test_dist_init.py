"""Joining ranks: the single-process fallback, torch's variables, and the size check."""
import os

import pytest
from fairscale.nn.model_parallel import initialize as mp
import torch.distributed as dist

from workers import dist as wdist

REAL_FROM_SUBMITIT = wdist._from_submitit  # before the fixture patches it


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(wdist, "_from_submitit", lambda: None)  # tests may run inside a submitit job
    yield
    wdist.shutdown()


def test_single_process_fallback_and_shutdown_twice():
    info = wdist.init_distributed(1)
    assert (info.rank, info.world_size, info.local_rank, info.node_rank) == (0, 1, 0, 0)
    assert info.device == "cpu" and info.backend == "gloo"
    assert mp.model_parallel_is_initialized() and mp.get_model_parallel_world_size() == 1
    wdist.barrier()
    wdist.shutdown()
    wdist.shutdown()
    assert not dist.is_initialized() and not mp.model_parallel_is_initialized()


def test_torch_variables_are_used(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(wdist._free_port()))
    assert wdist._rendezvous().source == "env"
    assert wdist.init_distributed(1).world_size == 1


def test_world_size_mismatch_says_what_it_got(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match="has 3 ranks .* needs shards=2"):
        wdist.init_distributed(2)
    assert not dist.is_initialized()


def test_outside_submitit_the_job_environment_is_not_used():
    if any(k.startswith("SUBMITIT_") or k == "SLURM_JOB_ID" for k in os.environ):
        pytest.skip("running inside a submitit or Slurm job")
    assert REAL_FROM_SUBMITIT() is None


def test_a_one_rank_job_listens_on_a_free_port_not_the_job_seeded_one(monkeypatch):
    """Another job on the node held the job-seeded port: a one-rank cell failed
    with EADDRINUSE although no other rank had to find it."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(wdist, "_from_submitit",
                            lambda: wdist._Rendezvous(0, 1, 0, 1, "127.0.0.1", port, "submitit"))
        rv = wdist._rendezvous()
        assert rv.source == "submitit" and rv.master_port != port
        assert wdist.init_distributed(1).world_size == 1
