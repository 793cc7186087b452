"""One rank of one cell: dist → cap → model → load → generate with telemetry → restore.

Every rank of a cell calls ``run_cell`` (submitit starts one process per GPU).
Rank ``r`` writes ``telemetry/rank-<r>.parquet``; rank 0 writes the requests
file and, after a barrier, ``DONE.json``. Any rank that fails writes
``FAILED.json`` with its traceback; the cap is restored in every case.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from orchestrator.contracts import (
    REQUESTS_SCHEMA,
    CellTask,
    SweepPaths,
    move_aside_outputs,
    slurm_context,
    write_done,
)


@dataclasses.dataclass(frozen=True)
class CellResult:
    cell_id: str
    rank: int
    telemetry_rows: int
    n_responses: int
    duration_s: float


def run_cell(task: CellTask) -> dict[str, Any]:
    """Run ``task`` on this rank. Returns a small summary; raises on failure
    (after writing FAILED.json) so the scheduler sees a failed job."""
    from workers import dist

    from workers import markers, stop
    from workers.gpu.caps import stop_on_term

    # The GPU layer reads NVML, which numbers cards along the PCI bus; CUDA numbers
    # the fastest first unless told otherwise. On a node of mixed cards an index in
    # CUDA_VISIBLE_DEVICES then named two cards: the one capped and sampled, and the
    # one the model ran on. Set before anything in this process starts CUDA.
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    paths = SweepPaths.of(task.sweep_dir)
    rank = dist.own_rank()  # FAILED.json names this rank even when joining fails
    token = peers = None
    ok = True
    try:
        stop_on_term()  # a cancel during start-up ends the worker, not ignored
        token = stop.push_action(lambda signum, notes: _failed_when_stuck(paths, task, rank, signum, notes))
        peers = _watch_peers(paths, task, rank)
        info = dist.init_distributed(
            task.params.shards,
            rendezvous=paths.launch_dir(task.cell_id) / f"rendezvous-{markers.run_id()}.a{task.attempt}.json",
            abort_if=lambda: markers.failure_reason(paths, task),
        )
        rank = info.rank
        _limit_cpu_threads(info)
        result = _run_rank(task, paths, info)
        return dataclasses.asdict(result)
    except BaseException as exc:  # SystemExit from a signal handler included
        ok = False
        if markers.this_runs_failure(paths, task) is not None:
            raise  # another rank failed first: its marker names the cause, ours would not
        markers.write_failure(paths, task, rank, error=_error_text(exc), traceback_text=traceback.format_exc())
        raise
    finally:
        if peers is not None:
            peers.finish(ok)
        dist.shutdown()
        stop.pop_action(token)


def _watch_peers(paths: SweepPaths, task: CellTask, rank: int) -> Any:
    """A cell of several ranks: notice a rank that is gone (workers/peers.py)."""
    from workers import markers
    from workers.peers import PeerWatch, timeout_s

    if task.params.shards <= 1 or timeout_s() <= 0:  # WATTSWEEP_PEER_TIMEOUT_S=0: no watch
        return None

    def stop_cell(verdict: tuple[int, str] | None) -> None:
        import signal

        try:
            print(f"wattsweep worker: rank {rank} stops: "
                  f"{verdict[1] if verdict else 'another rank of this attempt failed (FAILED.json)'}",
                  file=sys.stderr, flush=True)
            if verdict is not None and not markers.this_runs_failure(paths, task):
                peer, reason = verdict
                markers.write_failure(paths, task, peer, error=reason, traceback_text="", found_by_rank=rank)
        finally:  # a marker that cannot be written must not keep this rank waiting
            os.kill(os.getpid(), signal.SIGTERM)  # the handler (or the stop watcher) restores the cap

    folder = paths.launch_dir(task.cell_id) / f"alive-{markers.run_id()}.a{task.attempt}"
    try:
        return PeerWatch(folder, rank, task.params.shards, stop=stop_cell,
                         other_failed=lambda: markers.failed_by_another(paths, task, rank)).start()
    except OSError as exc:  # the cell can run without it
        print(f"wattsweep worker: no peer watch ({exc}); a rank that dies leaves the others to their timeouts",
              file=sys.stderr, flush=True)
        return None


def _failed_when_stuck(paths: SweepPaths, task: CellTask, rank: int, signum: int, notes: list) -> None:
    """FAILED.json from the stop watcher (workers/stop.py): the rank took a stop
    signal while its main thread was blocked; its traceback shows where."""
    import signal

    from workers import markers, stop

    if markers.this_runs_failure(paths, task) or markers.done_this_run(paths, task):
        return  # another rank failed first (its marker names the cause), or the cell is done
    blocked = stop.main_thread_stack()
    error = (f"stopped by {signal.Signals(signum).name} while blocked for {stop.grace_s():g} s"
             f"{' in ' + stop.innermost_function(blocked) if blocked else ''} (waiting on another rank?)")
    markers.write_failure(paths, task, rank, error="; ".join([error, *notes]),
                          traceback_text="Main thread, blocked:\n" + blocked, stopped_blocked=True)


def _error_text(exc: BaseException) -> str:
    """FAILED.json's one line: the exception and its message, or what stopped
    the worker when the exception has none (Ctrl-C, a bare exit)."""
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted (SIGINT)"
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if any(m in text for m in _PEER_GONE):
        # This rank saw a collective break; the cause is usually another rank that
        # died first (killed, out of memory), whose own log says why.
        text += " [another rank probably ended first: `wattsweep logs SWEEP_DIR CELL --rank N` for each rank]"
    return text


# How gloo and NCCL report a rank that went away in the middle of a collective.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def _limit_cpu_threads(info: Any) -> None:
    """On CPU, ranks of one node share its cores: without a limit each rank starts
    one thread per core and gloo collectives stall behind oversubscribed threads."""
    if info.device != "cpu":
        return
    import os

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // max(1, info.local_world_size)))


def _run_rank(task: CellTask, paths: SweepPaths, info: Any) -> CellResult:
    from workers import dist
    from workers.gpu import gpu_index_for_rank, select_backend
    from workers.gpu.caps import CapSession
    from workers.telemetry import Sampler

    p, opt = task.params, task.options
    if info.rank == 0:
        move_aside_outputs(paths, task.cell_id)  # a requeued or rerun cell starts clean
    dist.barrier()

    backend = select_backend(opt, local_rank=info.local_rank)
    try:
        gpu_index = gpu_index_for_rank(backend, info.local_rank)
        gpu = next(d for d in backend.devices() if d.index == gpu_index)
        ledgers = [paths.caps_ledger(task.cell_id)] + ([Path(opt.site_ledger)] if opt.site_ledger else [])
        slurm = slurm_context()
        with CapSession(
            backend, [gpu_index], p.power_cap_w, cell_id=task.cell_id, options=opt, ledger_paths=ledgers, slurm=slurm
        ) as caps:
            sampler = Sampler(
                backend,
                gpu_index,
                cell_id=task.cell_id,
                host=info.hostname,
                rank=info.rank,
                gpu_uuid=gpu.uuid,
                hz=opt.telemetry_hz,
                energy_hz=opt.energy_hz,
            )
            sampler.start()
            try:
                measured = _measure(task, info, sampler)
            finally:
                sampler.stop()
            meta = {
                "slurm": slurm,
                "gpu_name": gpu.name,
                "caps": [dataclasses.asdict(c) for c in caps],
                "weights": "random" if p.weights == "random" else "checkpoint",
                "attempt": task.attempt,
            }
            rows = sampler.write(paths.telemetry_file(task.cell_id, info.rank), meta)
    finally:
        backend.close()

    hosts = _gather_hosts(info.hostname)
    if info.rank == 0:
        _write_requests(paths, task.cell_id, measured["requests"])
    dist.barrier()  # every rank's telemetry is on disk before DONE.json
    if info.rank == 0:
        _write_done(task, paths, info, gpu.name, backend.source, hosts, slurm, [dataclasses.asdict(c) for c in caps],
                    measured["prompts_truncated"])
    dist.barrier()
    return CellResult(task.cell_id, info.rank, rows, len(measured["requests"]), measured["duration_s"])


def _decode_load(batch_size: int) -> float:
    """Relative load of a decode step for the simulated power model: memory-bound
    at small batches, approaching full load as the batch grows."""
    return min(1.0, 0.35 + 0.65 * batch_size / (batch_size + 16))


def _planned_path(task: CellTask, key: str, written: Any) -> Any:
    """The file the plan resolved ``key`` to (absolute, ``~`` expanded, from the
    folder `wattsweep sweep` ran in); as written when the plan has none. A path
    as written is relative to wherever the job happens to start: a resubmit from
    another folder, or a batch job's working directory, would not find it."""
    resolved = (task.options.extra or {}).get(f"{key}_resolved")
    return resolved if resolved and written not in (None, "random") else written


def _measure(task: CellTask, info: Any, sampler: Any) -> dict[str, Any]:
    """Load the model and prompts, warm up, then generate every batch inside the
    measured window. Returns the per-response rows (rank 0 keeps them)."""
    from workers import dist
    from workers.load import count_words, get_tokenizer, load_prompts, make_batches
    from workers.model import Generator, ModelArgs, build_model, resolve_args

    p, opt = task.params, task.options
    sampler.mark("load", load=0.1)
    # The checkpoint's own vocabulary (params.json or its embedding), not the config's.
    weights = _planned_path(task, "weights", p.weights)
    args = resolve_args(ModelArgs.from_dict(p.model_args), weights)
    tokenizer = get_tokenizer(_planned_path(task, "tokenizer_path", p.tokenizer_path), vocab_size=args.vocab_size)
    prompts = load_prompts(p.dataset, _planned_path(task, "dataset_path", p.dataset_path), p.n_prompts, p.seed)
    batches = make_batches(prompts, tokenizer, p.batch_size, p.max_prompt_tokens, p.sort_by_length)
    max_seq_len = p.max_prompt_tokens + p.max_new_tokens
    model = build_model(
        args, weights=weights, dtype=p.dtype, device=info.device, seed=p.seed,
        max_batch_size=p.batch_size, max_seq_len=max_seq_len, kv_cache_dtype=p.kv_cache_dtype,
    )
    gen = Generator(model, max_batch_size=p.batch_size, max_seq_len=max_seq_len, device=info.device, cuda_graph=opt.cuda_graph)
    _maybe_fail_on_purpose(opt.fail_on_purpose, info.rank)
    # Random weights never emit a meaningful EOS: generate exactly max_new_tokens.
    eos_id = None if p.weights == "random" else tokenizer.eos_id
    decode_load = _decode_load(p.batch_size)

    def on_phase(phase: str) -> None:
        sampler.mark(phase, load=1.0 if phase == "prefill" else decode_load)

    sampler.mark("warmup", load=decode_load)
    for batch in batches[: max(0, opt.warmup_batches)]:
        gen.generate([list(t) for t in batch.tokens], max_new_tokens=p.max_new_tokens, eos_id=eos_id)
    dist.barrier()
    _sync(info.device)
    sampler.window_start()
    t0 = time.perf_counter()
    requests: list[dict[str, Any]] = []
    generated: list[list[int]] = []  # each request's tokens, decoded to words after the window
    # A requeued attempt runs at full speed, so a cell slowed on purpose still finishes.
    pause_s = opt.sleep_s / max(1, len(batches)) if task.attempt == 0 else 0.0
    progress = _Progress(len(batches), enabled=info.rank == 0)
    for batch in batches:
        start_ns = time.time_ns()
        outs = gen.generate([list(t) for t in batch.tokens], max_new_tokens=p.max_new_tokens, eos_id=eos_id, on_phase=on_phase)
        end_ns = time.time_ns()
        if info.rank == 0:
            for pid, toks, out in zip(batch.prompt_ids, batch.tokens, outs):
                requests.append(
                    {
                        "cell_id": task.cell_id,
                        "prompt_id": pid,
                        "batch_index": batch.index,
                        "input_tokens": len(toks),
                        "output_tokens": len(out),
                        "start_ns": start_ns,
                        "end_ns": end_ns,
                    }
                )
                generated.append(out)
        progress.batch_done(len(outs))
        if pause_s:
            time.sleep(pause_s)  # tests: keeps a cell running long enough to be cancelled
    _sync(info.device)
    dist.barrier()
    sampler.window_end()
    duration_s = time.perf_counter() - t0
    sampler.mark("idle", load=0.0)
    for row, out in zip(requests, generated):  # detokenising is host work: outside the measured window
        row["output_words"] = count_words(tokenizer.decode(list(out)))
    truncated = sum(b.truncated for b in batches)
    if truncated and info.rank == 0:
        print(f"wattsweep worker: warning: {truncated} of {len(prompts)} prompts were cut to max_prompt_tokens="
              f"{p.max_prompt_tokens} (recorded as prompts_truncated in DONE.json)", file=sys.stderr)
    return {"requests": requests, "duration_s": duration_s, "prompts_truncated": truncated}


class _Progress:
    """A line in the job's log at the start of the measured window and then at
    most every PROGRESS_EVERY_S, so `wattsweep logs` shows how far a long cell
    is. A print is host work of microseconds: it does not move the measurement."""

    PROGRESS_EVERY_S = 30.0

    def __init__(self, n_batches: int, *, enabled: bool) -> None:
        self.n_batches, self.enabled = n_batches, enabled
        self.done = self.responses = 0
        self.t0 = self.last = time.monotonic()
        if enabled:
            print(f"wattsweep worker: measuring {n_batches} batch(es)", flush=True)

    def batch_done(self, responses: int) -> None:
        self.done += 1
        self.responses += responses
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.PROGRESS_EVERY_S or self.done == self.n_batches):
            self.last = now
            print(f"wattsweep worker: {self.done}/{self.n_batches} batches, {self.responses} responses, "
                  f"{now - self.t0:.0f} s", flush=True)


def _gather_hosts(hostname: str) -> list[str]:
    import torch.distributed as td

    if not td.is_initialized():
        return [hostname]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, hostname)
    return [str(h) for h in out]


def _maybe_fail_on_purpose(mode: str | None, rank: int) -> None:
    """Failure injection for tests of the failure paths: "raise" on every rank,
    "raise-rank-N" on rank N only (cells with fewer ranks run normally),
    "kill-rank-N": rank N dies by SIGKILL, as the out-of-memory killer ends a
    process (no traceback, no marker, no restore); "hang-rank-N": rank N stops
    answering and ignores SIGTERM, as a rank hung in a driver call, so the
    others block in their next collective."""
    if not mode:
        return
    if mode != "raise" and not mode.startswith(("raise-rank-", "kill-rank-", "hang-rank-")):
        raise ValueError(f"fail_on_purpose={mode!r} is not valid; valid: raise, raise-rank-N, kill-rank-N, hang-rank-N")
    if mode == f"hang-rank-{rank}":
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        print(f"wattsweep worker: rank {rank} hangs on purpose (fail_on_purpose={mode})", file=sys.stderr, flush=True)
        time.sleep(3600)
    if mode == f"kill-rank-{rank}":
        import os
        import signal

        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if mode in ("raise", f"raise-rank-{rank}"):
        raise RuntimeError(f"worker raised on purpose (fail_on_purpose={mode})")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _write_requests(paths: SweepPaths, cell_id: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.contracts import atomic_write_bytes

    table = pa.Table.from_pylist(rows, schema=REQUESTS_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(paths.requests_file(cell_id), sink.getvalue().to_pybytes())


def _write_done(task: CellTask, paths: SweepPaths, info: Any, gpu_name: str, source: str,
                hosts: list[str], slurm: dict[str, Any], caps: list[dict[str, Any]], prompts_truncated: int) -> None:
    import pyarrow.parquet as pq

    cdir = paths.cell_dir(task.cell_id)
    files: dict[str, int] = {}
    for r in range(info.world_size):
        f = paths.telemetry_file(task.cell_id, r)
        files[str(f.relative_to(cdir))] = pq.read_metadata(f).num_rows
    req = paths.requests_file(task.cell_id)
    files[str(req.relative_to(cdir))] = pq.read_metadata(req).num_rows
    write_done(
        paths,
        task.cell_id,
        files,
        {
            "world_size": info.world_size,
            "rendezvous": info.rendezvous,
            "nodes": len(set(hosts)),
            "hosts": hosts,
            "gpu_name": gpu_name,
            "telemetry_source": source,
            "weights": "random" if task.params.weights == "random" else task.params.weights,
            "slurm": slurm,
            "caps": caps,
            "attempt": task.attempt,
            "prompts_truncated": prompts_truncated,
            "submit_host": socket.gethostname(),
        },
    )
