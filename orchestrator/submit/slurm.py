"""The Slurm launcher: job arrays through submitit's Slurm executor.

Cells that need the same resources go into one job array (split below the
cluster's ``MaxArraySize``); ``submit`` returns as soon as ``sbatch`` has queued
them. A cell needing more GPUs than a node has spans
``ceil(shards / gpus_per_node)`` nodes with one task per GPU; the workers find
their rank and rendezvous from submitit's JobEnvironment.

Folder layout. submitit writes one folder per batch, so all Slurm jobs of a sweep
share ``SWEEP_DIR/launch/`` (pickles, sbatch scripts, ``<job>_<task>_log.{out,err}``).
Each cell's ``cells/<id>/launch/`` holds links to its own logs, and
``submissions.jsonl`` maps every array task id (``<array>_<index>``) to its cell.
"""
from __future__ import annotations

import math
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from orchestrator.contracts import SweepPaths, write_failed
from orchestrator.plan.planned import PlannedCell
from orchestrator.submit.base import (
    LaunchError,
    SubmissionRecord,
    append_submissions,
    make_task,
    next_attempt,
    prepare_cell_dir,
)
from orchestrator.submit.shell import SlurmCommandError, run_cmd

LAUNCH_SUBDIR = "launch"  # SWEEP_DIR/launch: submitit's shared folder
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default when scontrol cannot be read
DEFAULT_SIGNAL_DELAY_S = 90  # submitit's: USR2 this long before the time limit
_COUNT_RE = re.compile(r":\d+$")


@dataclass(frozen=True)
class SlurmResources:
    """What one cell asks of Slurm; cells with equal resources share a job array."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int | None
    gres: str | None  # e.g. "gpu:2" per node; None: no GPU request
    mem_gb: int | None  # per node
    time_min: int
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    sbatch_extra: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    array_parallelism: int = 64
    max_requeues: int = 3
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s), {self.time_min} min"


def resources_for(shards: int, cfg: Mapping[str, Any]) -> SlurmResources:
    """One task per GPU; as many nodes as the GPUs need."""
    gpn = int(cfg.get("gpus_per_node") or 1)
    if gpn < 1 or shards < 1:
        raise LaunchError(f"gpus_per_node={gpn}, shards={shards}; valid: both >= 1")
    tpn = min(shards, gpn)
    mem_per_gpu = cfg.get("mem_per_gpu_gb")
    return SlurmResources(
        nodes=math.ceil(shards / gpn),
        tasks_per_node=tpn,
        cpus_per_task=int(cfg["cpus_per_gpu"]) if cfg.get("cpus_per_gpu") else None,
        gres=_gres(cfg.get("gres"), tpn),
        mem_gb=int(mem_per_gpu) * tpn if mem_per_gpu else None,
        time_min=int(cfg.get("time_min") or 60),
        partition=cfg.get("partition") or None,
        account=cfg.get("account") or None,
        qos=cfg.get("qos") or None,
        constraint=cfg.get("constraint") or None,
        exclude=cfg.get("exclude") or None,
        sbatch_extra=tuple(str(x) for x in cfg.get("sbatch_extra") or ()),
        setup=tuple(str(x) for x in cfg.get("setup") or ()),
        array_parallelism=int(cfg.get("array_parallelism") or 64),
        max_requeues=int(cfg.get("max_requeues") if cfg.get("max_requeues") is not None else 3),
        signal_delay_s=int(cfg.get("signal_delay_s") or DEFAULT_SIGNAL_DELAY_S),
    )


def _gres(gres: Any, tasks_per_node: int) -> str | None:
    """None: ``gpu:<tasks per node>``; "" or "none": no GPU request (clusters
    without GRES); "gpu:v100": the count is appended; "gpu:v100:8": as given."""
    if gres is None:
        return f"gpu:{tasks_per_node}"
    text = str(gres).strip()
    if text.lower() in ("", "none"):
        return None
    return text if _COUNT_RE.search(text) else f"{text}:{tasks_per_node}"


def parse_sbatch_extra(lines: tuple[str, ...]) -> dict[str, Any]:
    """``#SBATCH --mail-type=END`` or ``--mail-type=END`` -> {"mail-type": "END"}."""
    out: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        text = text[len("#SBATCH"):].strip() if text.upper().startswith("#SBATCH") else text
        if not text.startswith("--"):
            raise LaunchError(f"sbatch_extra line {line!r}: expected a long option like '--mail-type=END'")
        key, eq, value = text[2:].partition("=")
        out[key.strip()] = value.strip() if eq else True
    return out


def sbatch_parameters(res: SlurmResources, job_name: str) -> dict[str, Any]:
    """submitit ``update_parameters`` keywords for these resources."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "array_parallelism": res.array_parallelism,
        "signal_delay_s": res.signal_delay_s,
        "setup": list(res.setup),
    }
    optional = {
        "cpus_per_task": res.cpus_per_task, "gres": res.gres, "partition": res.partition,
        "account": res.account, "qos": res.qos, "constraint": res.constraint, "exclude": res.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if res.mem_gb is not None:
        params["mem"] = f"{res.mem_gb}GB"
    extra = parse_sbatch_extra(res.sbatch_extra)
    if extra:
        params["additional_parameters"] = extra
    return params


def max_array_size() -> int:
    """The cluster's MaxArraySize (array indexes must stay below it)."""
    try:
        out = run_cmd(["scontrol", "show", "config"], timeout_s=30).stdout
    except SlurmCommandError:
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def _executor_class() -> type:
    """submitit's SlurmExecutor with sbatch run through ``run_cmd`` (imported lazily:
    submitit's Slurm side only loads for Slurm sweeps)."""
    from submitit.core import utils as sutils
    from submitit.slurm.slurm import SlurmExecutor

    class Executor(SlurmExecutor):
        def _internal_process_submissions(self, delayed: list[Any]) -> list[Any]:
            # submitit's array path, but its array executor is this class, so that
            # sbatch goes through run_cmd (submitit's own copy runs sbatch itself).
            if len(delayed) == 1:
                return super()._internal_process_submissions(delayed)
            folder = sutils.JobPaths.get_first_id_independent_folder(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            pickles = []
            for d in delayed:
                path = folder / f"{uuid.uuid4().hex}.pkl"
                d.set_timeout(self.parameters.get("time", 5), self.max_num_timeout)
                d.dump(path)
                pickles.append(path)
            array_ex = type(self)(self.folder, self.max_num_timeout)
            array_ex.update_parameters(**self.parameters)
            array_ex.parameters["map_count"] = len(delayed)
            first = array_ex._submit_command(self._submitit_command_str)
            tasks = list(range(first.num_tasks))
            jobs = [self.job_class(folder=self.folder, job_id=f"{first.job_id}_{a}", tasks=tasks)
                    for a in range(len(delayed))]
            for job, path in zip(jobs, pickles):
                job.paths.move_temporary_file(path, "submitted_pickle")
            return jobs

        def _submit_command(self, command: str) -> Any:
            folder = sutils.JobPaths.get_first_id_independent_folder(self.folder)
            script = folder / f".submission_file_{uuid.uuid4().hex}.sh"
            script.write_text(self._make_submission_file_text(command, script.stem))
            out = run_cmd(["sbatch", str(script)], timeout_s=120).stdout
            job_id = self._get_job_id_from_submission_command(out)
            job = self.job_class(folder=self.folder, job_id=job_id, tasks=list(range(self._num_tasks())))
            job.paths.move_temporary_file(script, "submission_file", keep_as_symlink=True)
            return job

    return Executor


def render_sbatch(folder: Path, res: SlurmResources, job_name: str, n_cells: int) -> str:
    """The sbatch script submitit would submit for an array of ``n_cells``."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params = sbatch_parameters(res, job_name)
    return _make_sbatch_string(command=command, folder=folder, map_count=n_cells if n_cells > 1 else None, **params)


@dataclass(frozen=True)
class _Chunk:
    res: SlurmResources
    cells: tuple[PlannedCell, ...]


class SlurmLauncher:
    """``Launcher`` for Slurm (see ``orchestrator.submit.base``)."""

    name = "slurm"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(cfg)

    # -- planning the arrays ------------------------------------------------

    def chunks(self, cells: list[PlannedCell], max_array: int) -> list[_Chunk]:
        """Group feasible cells by resources, in plan order; split below max_array."""
        groups: dict[SlurmResources, list[PlannedCell]] = {}
        for cell in cells:
            if not cell.feasible:
                continue
            cfg = {**self.cfg, **{k: v for k, v in (cell.launcher or {}).items() if k != "name"}}
            groups.setdefault(resources_for(cell.params.shards, cfg), []).append(cell)
        size = max(1, max_array)
        return [
            _Chunk(res, tuple(group[i : i + size]))
            for res, group in groups.items()
            for i in range(0, len(group), size)
        ]

    # -- the Launcher interface ----------------------------------------------

    def submit(self, paths: SweepPaths, cells: list[PlannedCell], *, dry_run: bool = False) -> list[SubmissionRecord]:
        folder = (paths.root / LAUNCH_SUBDIR).resolve()
        job_name = _job_name(paths)
        chunks = self.chunks(cells, max_array_size() if not dry_run else DEFAULT_MAX_ARRAY_SIZE)
        if dry_run:
            for ch in chunks:
                print(f"# {len(ch.cells)} cell(s), {ch.res.describe()}: {' '.join(c.cell_id for c in ch.cells)}")
                print(render_sbatch(folder, ch.res, job_name, len(ch.cells)))
            return []
        records: list[SubmissionRecord] = []
        errors: list[str] = []
        for ch in chunks:
            before = _files_in(folder)
            try:
                rec = self._submit_chunk(paths, folder, job_name, ch)
            except (SlurmCommandError, OSError) as e:
                _remove_new(folder, before)  # submitit's pickles and script of the refused array
                why = _refusal(e)
                errors.append(f"sbatch refused {len(ch.cells)} cell(s) [{' '.join(c.cell_id for c in ch.cells)}] "
                              f"({ch.res.describe()}): {why}")
                # The refusal goes to the sweep folder, not only the terminal:
                # status shows it as the cells' reason, resubmit retries them.
                for c in ch.cells:
                    write_failed(paths, c.cell_id, f"sbatch refused the job ({ch.res.describe()}): {why}", "",
                                 {"launcher": "slurm", "stage": "submit"})
                continue
            append_submissions(paths, [rec])  # recorded at once: the file is the only memory
            records.append(rec)
            print(f"submitted {len(rec.cell_ids)} cell(s) as Slurm job {rec.extra['array_job_id']} "
                  f"({ch.res.describe()})", flush=True)
        if errors:
            queued = sum(len(r.cell_ids) for r in records)
            jobs = " ".join(str(r.extra["array_job_id"]) for r in records) or "none"
            raise LaunchError("; ".join(errors) + f"; queued: {queued} cell(s) in job(s) {jobs}", records)
        return records

    def _submit_chunk(self, paths: SweepPaths, folder: Path, job_name: str, ch: _Chunk) -> SubmissionRecord:
        attempts = {c.cell_id: next_attempt(paths, c.cell_id) for c in ch.cells}
        for c in ch.cells:
            prepare_cell_dir(paths, c.cell_id)
        executor = _executor_class()(folder=folder, max_num_timeout=ch.res.max_requeues)
        executor.update_parameters(**sbatch_parameters(ch.res, job_name))
        with executor.batch():
            jobs = [executor.submit(make_task(paths, c, attempts[c.cell_id])) for c in ch.cells]
        job_ids = tuple(str(j.job_id) for j in jobs)
        for c, jid in zip(ch.cells, job_ids):
            link_logs(paths, c.cell_id, folder, jid, ch.res.tasks)
        return SubmissionRecord(
            cell_ids=tuple(c.cell_id for c in ch.cells),
            launcher=self.name,
            job_ids=job_ids,
            array=len(jobs) > 1,
            submitted_unix_s=time.time(),
            attempt=max(attempts.values()),
            extra={
                "array_job_id": job_ids[0].split("_")[0],
                "folder": str(folder),
                "nodes": ch.res.nodes,
                "tasks_per_node": ch.res.tasks_per_node,
                "resources": asdict(ch.res),
            },
        )

    def wait(self, paths: SweepPaths, records: list[SubmissionRecord], poll_s: float = 2.0) -> None:
        """Block until no job of these records is in the queue any more."""
        arrays = sorted({str(r.extra.get("array_job_id")) for r in records if r.extra})
        while arrays:
            proc = run_cmd(["squeue", "-h", "-j", ",".join(arrays), "-o", "%F"], check=False, timeout_s=60)
            alive = {ln.strip() for ln in proc.stdout.splitlines() if ln.strip()}
            arrays = [a for a in arrays if a in alive]
            if arrays:
                time.sleep(poll_s)


def _refusal(e: Exception) -> str:
    """sbatch's own words and exit status, without the command line: it names
    the temporary script, which is removed with the refused array
    (`wattsweep sweep --dry-run` prints the script)."""
    if isinstance(e, SlurmCommandError) and e.stderr.strip():
        lines = [ln.strip() for ln in e.stderr.strip().splitlines() if ln.strip()]
        return "; ".join(lines[:3]) + f" (sbatch exited {e.returncode})"
    return str(e)


def link_logs(paths: SweepPaths, cell_id: str, folder: Path, job_id: str, tasks: int) -> None:
    """Links in ``cells/<id>/launch/`` to this cell's logs in the shared folder."""
    ldir = paths.launch_dir(cell_id)
    ldir.mkdir(parents=True, exist_ok=True)
    for t in range(tasks):
        for suffix in ("out", "err"):
            name = f"{job_id}_{t}_log.{suffix}"
            link = ldir / name
            if not link.is_symlink():
                link.symlink_to(Path("..", "..", "..", folder.name, name))


def _job_name(paths: SweepPaths) -> str:
    return f"ws-{paths.root.resolve().name}"[:48]


__all__ = [
    "SlurmLauncher", "SlurmResources", "resources_for", "sbatch_parameters", "parse_sbatch_extra",
    "render_sbatch", "max_array_size", "link_logs",
]


def _files_in(folder: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(folder) if e.is_file()}
    except OSError:
        return set()


def _remove_new(folder: Path, before: set[str]) -> None:
    """Files a failed sbatch left in the launch folder (one submitter at a time:
    whatever appeared since ``before`` is that array's)."""
    for name in _files_in(folder) - before:
        if name.endswith((".pkl", ".sh")):
            try:
                os.unlink(folder / name)
            except OSError:
                pass
