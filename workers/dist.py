"""Joining the ranks of one cell: torch.distributed, then FairScale model parallel.

Where rank and world size come from, first match wins:
1. submitit's job environment (local or Slurm executor): ``TorchDistributedEnvironment``
   gives rank, world, local rank and the master address/port (port seeded by the job id);
2. torch's variables ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
   (``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` optional), as torchrun sets them;
3. otherwise one process on a free local port.
A job of one rank always listens on a free local port: the job-seeded port of
(1) can be held by another job on the same node.
The backend is nccl on CUDA (device ``cuda:<local_rank>``), gloo on the CPU.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as mp


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: str  # "cuda:N" or "cpu"
    backend: str  # "nccl" | "gloo"
    hostname: str
    node_rank: int


@dataclass(frozen=True)
class _Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "submitit" | "env" | "single"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _from_submitit() -> _Rendezvous | None:
    try:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        submitit.JobEnvironment()  # raises outside a submitit job
        env = TorchDistributedEnvironment()
    except (ImportError, RuntimeError):
        return None
    return _Rendezvous(env.rank, env.world_size, env.local_rank, env.local_world_size,
                       env.master_addr, int(env.master_port), "submitit")


def _from_env() -> _Rendezvous | None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return _Rendezvous(rank, world, int(os.environ.get("LOCAL_RANK", rank)),
                       int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                       os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")), "env")


def _rendezvous() -> _Rendezvous:
    rv = _from_submitit() or _from_env() or _Rendezvous(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")
    if rv.world_size == 1 and rv.source != "single":
        # No other rank has to find this one: a port the system says is free,
        # not the job-seeded one, which another job on the node may hold
        # (a cell failed with EADDRINUSE that way).
        return _Rendezvous(0, 1, rv.local_rank, rv.local_world_size, "127.0.0.1", _free_port(), rv.source)
    return rv


def _device_for(local_rank: int, local_world: int) -> str:
    if not torch.cuda.is_available():
        return "cpu"
    visible = torch.cuda.device_count()
    if visible == 1:  # Slurm with one GPU per task: each rank sees only its own
        return "cuda:0"
    if local_rank < visible:
        return f"cuda:{local_rank}"
    raise RuntimeError(f"local rank {local_rank} of {local_world} needs a GPU but this node shows {visible}; "
                       "ask for one GPU per rank")


def init_distributed(expected_world_size: int, *, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group and make a model-parallel group of all ranks."""
    rv = _rendezvous()
    if rv.world_size != expected_world_size:
        raise RuntimeError(f"this job has {rv.world_size} ranks (from {rv.source}) but the cell needs "
                           f"shards={expected_world_size}; launch one task per shard")
    device = _device_for(rv.local_rank, rv.local_world_size)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method=f"tcp://{rv.master_addr}:{rv.master_port}",
                                rank=rv.rank, world_size=rv.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if not mp.model_parallel_is_initialized():
        mp.initialize_model_parallel(rv.world_size)
    return DistInfo(rank=rv.rank, world_size=rv.world_size, local_rank=rv.local_rank,
                    local_world_size=rv.local_world_size, device=device, backend=backend,
                    hostname=socket.gethostname(), node_rank=rv.rank // max(1, rv.local_world_size))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave model parallel and the process group; a no-op when not joined."""
    if mp.model_parallel_is_initialized():
        mp.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
