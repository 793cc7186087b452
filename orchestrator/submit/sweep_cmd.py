"""``wattsweep sweep``: compose → plan → write the sweep folder → submit → print.

Returns as soon as the cells are queued; ``--wait`` waits for them and reduces.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from orchestrator.submit.shell import quoted

DESCRIPTION = """Plan a sweep from Hydra overrides and launch its feasible cells.

Each combination of the swept values is one cell, identified by a hash of its
parameters. Cells that cannot run (shards not dividing the heads, not fitting
the GPUs' memory, a cap outside the card's range) stay in the plan with a
reason and are not launched. The command prints the sweep folder and a table
of cells, and returns once they are queued."""

EPILOG = """override grammar (Hydra):
  key=value                 set a value            shards=2  power_cap_w=null  model.n_layers=4
  group=option              choose a config        model=llama-7b  dataset=alpaca  launcher=slurm
  key=a,b,c                 sweep a list (-m)      batch_size=1,8,64  power_cap_w=null,250,175,150
  key=range(start,stop[,step])  sweep a range (-m) shards=range(1,9)  (stop excluded)
  key=choice(a,b)           same as a,b (-m)
  +experiment=NAME          add a preset (-m)      +experiment=paper_throughput
  +key=value / ++key=value  add / force a key (must still be a known key)

config groups and choices:
{groups}

examples:
  wattsweep sweep -m +experiment=smoke --wait            four tiny cells in seconds, then the summary
  wattsweep sweep -m shards=1,2 batch_size=1,4 n_prompts=16 max_new_tokens=32 --wait
                                                         the same grid by hand (the README's first run)
  wattsweep sweep                                        one cell of the default config: 4,096 prompts of
                                                         256 new tokens, tens of minutes on a CPU
  wattsweep sweep -m model=llama-7b shards=1,2,4 power_cap_w=null,250,175,150 launcher=slurm launcher.partition=gpu
  wattsweep sweep -m +experiment=paper_powercap launcher=slurm --dry-run
  wattsweep sweep dataset=alpaca dataset.path=/data/alpaca_data.json gpu.profile=a100
  wattsweep sweep -m model=llama-7b batch_size=1,64 kv_cache_dtype=auto,float8_e4m3fn gpu.profile=h100

top-level keys:
{keys} (and model.*, dataset.*, gpu.*, launcher.*)

exit status: 0 queued (with --wait: every launched cell gave a valid result); 1 a launch
failed, or with --wait some cell gave no valid result (the line says how many; resubmit
them with `wattsweep resubmit SWEEP_DIR`); 2 a bad override, or no feasible cell."""


def _groups_text() -> str:
    import hydra_conf

    root = Path(hydra_conf.__file__).parent
    lines = []
    for group in ("model", "dataset", "launcher", "gpu", "experiment"):
        names = sorted(p.stem for p in (root / group).glob("*.yaml"))
        lines.append(f"  {group + ':':<12}{', '.join(names)}")
    return "\n".join(lines)


def _keys_text() -> str:
    """The schema's top-level keys, wrapped: the list never drifts from the config."""
    import dataclasses
    import textwrap

    from orchestrator.config.schema import CONFIG_GROUPS, SweepConf

    keys = [f.name for f in dataclasses.fields(SweepConf) if f.name not in (*CONFIG_GROUPS, "grid", "description")]
    return textwrap.fill(" ".join(keys), width=88, initial_indent="  ", subsequent_indent="  ")


try:
    EPILOG = EPILOG.format(groups=_groups_text(), keys=_keys_text())
except Exception:  # the package data is missing: the help still works
    EPILOG = EPILOG.format(groups="  (hydra_conf/ not found)", keys="  (hydra_conf/ not found)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--multirun", action="store_true", help="expand swept values (a,b / range() / +experiment=) into a grid")
    parser.add_argument("--wait", action="store_true", help="wait until every cell has ended, then reduce and print the summary")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (and what each launcher would submit); write and submit nothing")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. model=llama-7b shards=1,2")


def _cpu_memory_bytes(launcher_name: str) -> int | None:
    """Host memory for cells the local launcher runs on this machine's CPU (none: it has a GPU)."""
    if launcher_name != "local":
        return None
    from orchestrator.submit.local import cpu_memory_bytes

    return cpu_memory_bytes()


def run(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, compose_cells
    from orchestrator.contracts import SweepPaths
    from orchestrator.plan import plan_cells, write_plan, write_sweep_yaml
    from orchestrator.plan.feasibility import PolicyError
    from orchestrator.submit.base import LaunchError, get_launcher, submit_lock

    try:
        composed = compose_cells(list(args.overrides), args.multirun)
        cells = plan_cells(composed, _cpu_memory_bytes(composed.launcher_name))
        launcher = get_launcher(composed.launcher_name, cells[0].launcher if cells else {})
    except (ConfigError, PolicyError, LaunchError) as e:
        print(f"wattsweep sweep: {e}", file=sys.stderr)
        return 2
    paths = SweepPaths.of(composed.sweep_dir)
    feasible = [c for c in cells if c.feasible]
    if args.dry_run:
        print(f"dry run: sweep folder would be {paths.root}")
        print(format_cells(cells, {}))
        if not feasible:  # the exit status the real run gives
            print("wattsweep sweep: every cell is infeasible (reasons above); nothing was launched", file=sys.stderr)
            return 2
        try:
            launcher.submit(paths, cells, dry_run=True)
        except LaunchError as e:  # what the real submission would refuse (the local GPU list, say)
            print(f"wattsweep sweep: {e}", file=sys.stderr)
            return 2
        return 0
    if not feasible:  # before the lock, which creates the folder: nothing to launch, nothing to leave behind
        print(format_cells(cells, {}))
        print("wattsweep sweep: every cell is infeasible (reasons above); nothing was launched", file=sys.stderr)
        return 2
    if not composed.sweep_dir_given:
        composed = _fresh_default_folder(composed)
        paths = SweepPaths.of(composed.sweep_dir)
    # Under the sweep's lock from before the plan exists: a cancel or resubmit
    # started meanwhile waits for every cell to be queued instead of missing some.
    try:
        with submit_lock(paths, "sweep"):
            if paths.plan_jsonl.exists():  # checked under the lock: two sweeps into one new folder
                raise LaunchError(f"{paths.root} already holds a sweep; choose another sweep_dir=..., "
                                  f"or use `wattsweep resubmit {quoted(paths.root)}`")
            write_sweep_yaml(paths, composed, len(cells), len(feasible))
            write_plan(paths, cells)
            try:
                records, failure = launcher.submit(paths, feasible), None
            except LaunchError as e:
                records, failure = e.records, e  # some cells may be queued: show them all the same
    except LaunchError as e:  # the folder holds a sweep, or another command has it
        print(f"wattsweep sweep: {e}", file=sys.stderr)
        return 2
    jobs = {cid: jid for r in records for cid, jid in zip(r.cell_ids, r.job_ids)}
    print(f"sweep folder: {paths.root}")
    refused = {c.cell_id for c in feasible if c.cell_id not in jobs} if failure is not None else set()
    print(format_cells(cells, jobs, refused))
    launched = len(feasible) if failure is None else sum(len(r.cell_ids) for r in records)
    print(f"{launched} cell(s) launched ({composed.launcher_name}), {len(cells) - len(feasible)} infeasible")
    if failure is not None:
        print(f"wattsweep sweep: {failure}", file=sys.stderr)
        print(f"the refused cells are marked failed with the reason; fix it and run `wattsweep resubmit {quoted(paths.root)}`"
              f" (--launcher KEY=VALUE changes their resources)", file=sys.stderr)
        return 1
    if not args.wait:
        print(f"follow with: wattsweep status {quoted(paths.root)}")
        return 0
    try:
        with _Progress(paths, [c.cell_id for c in feasible]):
            launcher.wait(paths, records)
    except KeyboardInterrupt:  # only the waiting stops: the cells were handed to the launcher
        root = quoted(paths.root)
        print(f"\nwattsweep sweep: stopped waiting; the cells run on. `wattsweep status {root} --watch` follows "
              f"them, `wattsweep cancel {root}` stops them, `wattsweep reduce {root}` summarises them once "
              f"they end", file=sys.stderr)
        return 130
    return _reduce_and_print(paths.root, [c.cell_id for c in feasible])


def _fresh_default_folder(composed: Any) -> Any:
    """The default folder is named by the second it was asked for: two sweeps started in
    one second chose one folder, and the second failed on a name its user never gave.
    Claim it with an atomic mkdir, else the same name with -2, -3, ... appended."""
    import dataclasses

    root = Path(composed.sweep_dir)
    root.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = root if n == 1 else root.with_name(f"{root.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        config = dict(composed.config)
        if "sweep_dir" in config:
            config["sweep_dir"] = str(candidate)
        return dataclasses.replace(composed, sweep_dir=candidate, config=config)
    return composed  # a thousand sweeps in one second: the lock's check below refuses by name


class _Progress:
    """While --wait blocks, say how many cells have ended: a live line on a terminal,
    a line every 30 s in a log. Counts markers only, so it costs a few stat calls."""

    def __init__(self, paths: Any, cell_ids: list[str]) -> None:
        import threading

        self.paths, self.cell_ids = paths, cell_ids
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> "_Progress":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        if self.tty:
            print(file=sys.stderr)

    def _line(self, elapsed_s: float) -> str:
        from orchestrator.status.cmd import bar

        done = sum(self.paths.done_marker(c).exists() for c in self.cell_ids)
        failed = sum(self.paths.failed_marker(c).exists() for c in self.cell_ids)
        n = len(self.cell_ids)
        return f"{bar(done + failed, n)} {done}/{n} done, {failed} failed, {elapsed_s:.0f} s"

    def _loop(self) -> None:
        import time

        t0 = time.monotonic()
        period_s = 1.0 if self.tty else 30.0
        while not self.stop.wait(period_s):
            line = self._line(time.monotonic() - t0)
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)


def _reduce_and_print(sweep_dir: Any, cell_ids: list[str]) -> int:
    """Reduce, print the summary, and say which launched cells did not give a
    valid result: the exit status is 1 then, so a script that waited knows."""
    try:
        from orchestrator.reduce import format_table, read_invalid, reduce_sweep
    except ImportError as e:
        print(f"wattsweep sweep: cannot reduce ({e}); run `wattsweep reduce {quoted(sweep_dir)}` once available", file=sys.stderr)
        return 1
    try:
        table = reduce_sweep(sweep_dir)
    except Exception as e:  # the reducer names what is wrong; keep it to one line here
        print(f"wattsweep sweep: reduce failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    if table.num_rows:
        print(format_table(table))
    valid = set(table.column("cell_id").to_pylist())
    invalid = dict(read_invalid(sweep_dir))
    lost = [c for c in cell_ids if c not in valid]
    if not lost:
        return 0
    cancels = _cancelled(sweep_dir)
    n_invalid = sum(c in invalid for c in lost)
    n_cancelled = sum(c in cancels and c not in invalid for c in lost)
    from orchestrator.contracts import SweepPaths
    from orchestrator.plan.planned import read_plan

    shards_of = {c.cell_id: c.params.shards for c in read_plan(SweepPaths.of(sweep_dir))}
    whys = {cid: f"cancelled: {cancels[cid]}" if cid in cancels and cid not in invalid
            else _why_lost(sweep_dir, cid, invalid, shards_of) for cid in lost}
    n_timeout = sum(why.startswith("timeout: ") for why in whys.values())
    print(f"wattsweep sweep: {len(lost)} of {len(cell_ids)} cell(s) gave no valid result ({n_cancelled} cancelled, "
          f"{n_timeout} timed out, {len(lost) - n_invalid - n_cancelled - n_timeout} failed or missing, "
          f"{n_invalid} invalid); see `wattsweep status "
          f"{quoted(sweep_dir)}` and `wattsweep logs {quoted(sweep_dir)} CELL`; `wattsweep resubmit {quoted(sweep_dir)}` reruns them once "
          f"the cause is fixed", file=sys.stderr)
    for cid in lost[:SHOWN_FAILURES]:  # the reasons, so a bad input file is seen without another command
        print(f"  {cid}: {whys[cid]}", file=sys.stderr)
    if len(lost) > SHOWN_FAILURES:
        print(f"  (and {len(lost) - SHOWN_FAILURES} more)", file=sys.stderr)
    return 1


SHOWN_FAILURES = 5


def _cancelled(sweep_dir: Any) -> dict[str, str]:
    """Cells whose latest job `wattsweep cancel` stopped -> who and when."""
    from orchestrator.contracts import SweepPaths
    from orchestrator.submit.cancellations import cancelled_latest

    return {cid: c.describe() for cid, c in cancelled_latest(SweepPaths.of(sweep_dir)).items()}


def _why_lost(sweep_dir: Any, cell_id: str, invalid: dict[str, str], shards_of: dict[str, int]) -> str:
    from orchestrator.contracts import SweepPaths
    from orchestrator.status.state import failed_reason, hit_time_limit

    paths = SweepPaths.of(sweep_dir)
    if cell_id in invalid:
        return f"invalid: {invalid[cell_id]}"
    if not paths.failed_marker(cell_id).is_file():
        return "no DONE.json or FAILED.json"
    reason = failed_reason(paths, cell_id, shards_of.get(cell_id))
    if hit_time_limit(reason):  # as `wattsweep status` says it: with the way to more time
        return "timeout: " + reason.splitlines()[0][:300]
    return "failed: " + reason.splitlines()[0][:300]


def format_cells(cells: list[Any], jobs: dict[str, str], refused: set[str] | frozenset[str] = frozenset()) -> str:
    """One line per cell: id, model, shards, batch, cap, dataset, GPU, state or reason."""
    header = ("cell", "model", "shards", "nodes", "batch", "cap_w", "dataset", "gpu", "state")
    rows = [header]
    for c in cells:
        p = c.params
        if not c.feasible:
            state = f"infeasible: {c.reason}"
        elif c.cell_id in jobs:
            state = f"queued (job {jobs[c.cell_id]})"
        elif c.cell_id in refused:
            state = "refused by sbatch (marked failed; reason below)"
        else:
            state = "planned"
        cap = "-" if p.power_cap_w is None else f"{p.power_cap_w:g}"
        rows.append((c.cell_id, p.model, str(p.shards), str(c.nodes), str(p.batch_size), cap, p.dataset, p.gpu_kind, state))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1] for r in rows)
