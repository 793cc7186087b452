"""Joining the ranks of one cell: torch.distributed, then FairScale model parallel.

Where rank and world size come from, first match wins:
1. submitit's job environment (local or Slurm executor): ``TorchDistributedEnvironment``
   gives rank, world, local rank and the master address;
2. torch's variables ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
   (``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` optional), as torchrun sets them;
3. otherwise one process on a free local port.
No rank of a submitit job listens on a port it did not get from the system.
submitit's port is seeded by the job id, and another job on the node can hold it
(a cell failed with EADDRINUSE that way). So a job of one rank listens on a free
local port, and in a job of several ranks rank 0 opens torch's key-value store on
a port the system picks and publishes ``host:port`` in the cell's folder
(``launch/rendezvous-<job>.<restart>.a<attempt>.json``, seen by every node of the
job); the other ranks read it from there. The name holds the job, its restart
count and the cell's attempt, so a requeued or resubmitted cell never reads an
earlier job's address.
The backend is nccl on CUDA (device ``cuda:<local_rank>``), gloo on the CPU.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    # how the ranks found rank 0: "published" (file in the cell folder), "seeded"
    # (submitit's job-seeded port), "env" (torch's variables), "single" (one rank)
    rendezvous: str = "single"


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


def own_rank() -> int:
    """This process's rank before joining (0 when nothing says): what FAILED.json
    names when the join itself fails."""
    try:
        rv = _from_submitit() or _from_env()
    except (ValueError, KeyError):
        return 0
    return rv.rank if rv else 0


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


def init_distributed(expected_world_size: int, *, timeout_s: float = 600.0,
                     rendezvous: Path | None = None, abort_if: Callable[[], str | None] | None = None) -> DistInfo:
    """Join the process group and make a model-parallel group of all ranks.

    ``rendezvous``: the file where rank 0 of a multi-rank submitit job publishes
    its store's address (in a folder every node sees; name it with ``job_key``).
    Without it such a job uses the job-seeded port. ``abort_if``: called while a
    rank waits for rank 0's address; a text (why: rank 0 failed first, so this
    attempt's FAILED.json exists) ends the wait at once."""
    rv = _rendezvous()
    if rv.world_size != expected_world_size:
        raise RuntimeError(f"this job has {rv.world_size} ranks (from {rv.source}) but the cell needs "
                           f"shards={expected_world_size}; launch one task per shard")
    device = _device_for(rv.local_rank, rv.local_world_size)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    how = "single" if rv.world_size == 1 else ("env" if rv.source == "env" else "seeded")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if rv.world_size > 1 and rv.source == "submitit" and rendezvous is not None:
            how = "published"
            published = Path(rendezvous)
            store = _published_store(rv, published, timeout_s, abort_if)
            dist.init_process_group(backend=backend, store=store, rank=rv.rank, world_size=rv.world_size,
                                    timeout=timeout)
            if rv.rank == 0:
                remove_when_joined(store, published, rv.world_size, timeout_s)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://{rv.master_addr}:{rv.master_port}",
                                    rank=rv.rank, world_size=rv.world_size, timeout=timeout)
    if not mp.model_parallel_is_initialized():
        mp.initialize_model_parallel(rv.world_size)
    return DistInfo(rank=rv.rank, world_size=rv.world_size, local_rank=rv.local_rank,
                    local_world_size=rv.local_world_size, device=device, backend=backend,
                    hostname=socket.gethostname(), node_rank=rv.rank // max(1, rv.local_world_size),
                    rendezvous=how)


def job_key() -> str:
    """This job's name for its rendezvous and heartbeat files, the same on every
    rank of a cell: the Slurm job (one per array task) and its restart count;
    submitit's local job id on the local launcher (even inside an allocation,
    whose SLURM_JOB_ID every local run would share); the rendezvous address
    for ranks started by RANK/WORLD_SIZE; this process's pid alone otherwise,
    where no other rank reads the files."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and os.environ.get("SUBMITIT_LOCAL_JOB_ID"):
        job = f"local{os.environ['SUBMITIT_LOCAL_JOB_ID']}"
    elif os.environ.get("SLURM_JOB_ID"):
        job = os.environ["SLURM_JOB_ID"]
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        job = f"env{os.environ.get('MASTER_ADDR', '127.0.0.1')}-{os.environ.get('MASTER_PORT', '29500')}"
    else:
        try:
            import submitit

            job = submitit.JobEnvironment().job_id
        except (ImportError, RuntimeError):
            job = f"pid{os.getpid()}"
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}".replace("/", "_").replace(":", "_")


def _published_store(rv: _Rendezvous, published: Path, timeout_s: float,
                     abort_if: Callable[[], str | None] | None) -> dist.TCPStore:
    """Rank 0: a store on a port the system picks, its address written to
    ``published``. Others: wait for that file, then connect."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rv.rank == 0:
        store = dist.TCPStore(rv.master_addr, 0, rv.world_size, True, timeout, wait_for_workers=False)
        from orchestrator.contracts import atomic_write_json

        atomic_write_json(published, {"addr": rv.master_addr, "port": int(store.port), "host": socket.gethostname(),
                                      "pid": os.getpid(), "written_unix_s": time.time()})
        return store
    addr, port = wait_for_address(published, timeout_s, abort_if)
    store = dist.TCPStore(addr, port, rv.world_size, False, timeout)
    store.add(_JOINED, 1)
    return store


# Counted in rank 0's store by each other rank once it has connected.
_JOINED = "wattsweep/joined"


def remove_when_joined(store: dist.Store, published: Path, world_size: int, timeout_s: float,
                       poll_s: float = 0.05) -> None:
    """Rank 0: remove the rendezvous file once every other rank has connected.
    Not as soon as the process group exists: with NCCL, init_process_group
    returns before the other ranks have joined (gloo's waits for them), and a
    rank that started late then found no file and waited out its timeout."""
    started = time.time()
    while (joined := store.add(_JOINED, 0)) < world_size - 1:
        if time.time() - started > timeout_s:
            raise RuntimeError(f"{joined} of the {world_size - 1} other ranks connected within {timeout_s:.0f} s; "
                               "read their logs (`wattsweep logs SWEEP_DIR CELL --rank N`)")
        time.sleep(poll_s)
    published.unlink(missing_ok=True)


def wait_for_address(published: Path, timeout_s: float, abort_if: Callable[[], str | None] | None = None,
                     poll_s: float = 0.2) -> tuple[str, int]:
    """(addr, port) from rank 0's rendezvous file, once it is there. Gives up when
    ``abort_if`` says why (rank 0 failed first) or after ``timeout_s``, naming the
    file it waited for."""
    started = time.time()
    while True:
        try:
            record = json.loads(published.read_text())
            return str(record["addr"]), int(record["port"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
            raise RuntimeError(f"rank 0's rendezvous file {published} is not readable ({e}); "
                               "resubmit the cell") from None
        if abort_if is not None and (why := abort_if()):
            raise RuntimeError(f"rank 0 failed before it published its address ({why})")
        if time.time() - started > timeout_s:
            raise RuntimeError(f"rank 0 did not publish its address in {published} within {timeout_s:.0f} s; "
                               "its log says why (`wattsweep logs SWEEP_DIR CELL --rank 0`)")
        time.sleep(poll_s)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave model parallel and the process group; a no-op when not joined."""
    if mp.model_parallel_is_initialized():
        mp.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
