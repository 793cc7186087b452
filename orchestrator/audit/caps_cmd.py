"""``wattsweep caps show|restore``: a node's power caps and their save files."""
from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from workers.gpu.base import GpuError
from workers.gpu.repair import backend_for, repair_node
from workers.gpu.state import SaveFile, list_nodes, node_dir, node_name, owner_alive, read_saves, resolve_state_dir

DESCRIPTION = """Show or restore power caps on this node from their save files.

A save file (STATE_DIR/nodes/<node>/caps/gpu-<uuid>.json) holds a GPU's limit
from before a job changed it; it stays behind only when the job was killed
(SIGKILL, node failure). `restore` puts those GPUs back to their previous
limit and records a `repair` in the ledgers; the Slurm prolog and epilog run
`wattsweep caps restore --all`."""
EPILOG = """exit status: 0 every GPU restored, nothing to do, or skipped because the job that
capped it still runs (it restores its own); 1 a GPU could not be restored; 2 usage error,
or the state folder is unusable: a --state-dir that does not exist, or a file. A default or
$WATTSWEEP_STATE_DIR folder that does not exist means nothing was capped with it here (0).

examples:
  wattsweep caps show
  wattsweep caps restore --all            every GPU of this node with a save file
  wattsweep caps restore --index 3
  wattsweep caps restore --all --node n2 --state-dir /shared/wattsweep   (simulated nodes only)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("show", "restore"), default="show")
    p.add_argument("--node", help="the node whose save files to use (default: this node, $SLURMD_NODENAME or host name)")
    p.add_argument("--all", action="store_true", help="restore: every GPU with a save file; show: every node in the state folder")
    p.add_argument("--index", type=int, action="append", help="restore only this GPU (repeatable)")
    p.add_argument("--force", action="store_true", help="restore even if the process that capped the GPU still runs")
    p.add_argument("--state-dir", help="state folder, which must exist (default: $WATTSWEEP_STATE_DIR, /var/lib/wattsweep, "
                                       "$TMPDIR/wattsweep-$USER)")
    p.add_argument("--site-ledger", help="site ledger to record repairs in (default: $WATTSWEEP_SITE_LEDGER or /var/log/wattsweep/caps.jsonl)")


def state_dir_problem(state_dir: Path, explicit: bool) -> str | None:
    """Why the state folder cannot be used, or None. A folder that does not exist
    is fine unless given with --state-dir: the default or $WATTSWEEP_STATE_DIR
    folder appears with the first cap (the epilog then has nothing to do)."""
    if state_dir.exists() and not state_dir.is_dir():
        return f"state folder {state_dir} is not a folder; give the jobs' state folder (gpu.state_dir, WATTSWEEP_STATE_DIR)"
    if explicit and not state_dir.exists():
        return f"state folder {state_dir} does not exist; give the jobs' state folder (gpu.state_dir, WATTSWEEP_STATE_DIR)"
    return None


def owner_running(save: SaveFile) -> bool:
    """Whether the process that set a cap may still run. This host checks its
    own processes; another host's (`caps restore --node n1` on a login node)
    it cannot see, so it asks Slurm whether the job that set the cap is still
    in the queue. Without a job, or without an answer, it assumes the process
    runs: pulling a cap from under a running measurement is the harm to avoid."""
    if save.host == socket.gethostname():
        return owner_alive(save)
    if save.job_id is None:
        return True
    from orchestrator.submit.shell import SlurmCommandError, run_cmd

    try:
        proc = run_cmd(["squeue", "-h", "-j", str(save.job_id), "-o", "%T"], check=False)
    except SlurmCommandError:
        return True
    if proc.returncode != 0:
        return "invalid job id" not in (proc.stderr or "").lower()  # an ended job has left the queue
    return bool(proc.stdout.strip())


def run(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir)
    problem = state_dir_problem(state_dir, explicit=bool(args.state_dir))
    if problem:
        print(f"wattsweep caps {args.action}: {problem}", file=sys.stderr)
        return 2
    if args.action == "show":
        return _show(state_dir, list_nodes(state_dir) if args.all and not args.node else [args.node or node_name()])
    if not args.all and not args.index:
        print("wattsweep caps restore: say which GPUs: --all (every GPU with a save file) or --index I", file=sys.stderr)
        return 2
    try:
        outcomes = repair_node(state_dir, args.node, indices=None if args.all else args.index, force=args.force,
                               site_ledger=args.site_ledger, owner_running=owner_running)
    except ValueError as exc:  # an unreadable save file
        print(f"wattsweep caps restore: {exc}", file=sys.stderr)
        return 1
    node = args.node or node_name()
    if not outcomes and not state_dir.exists():
        print(f"{node}: state folder {state_dir} does not exist (nothing was capped with it here); nothing to restore")
    elif not outcomes:
        print(f"{node}: no save files in {node_dir(state_dir, node)}; nothing to restore")
        others = [n for n in list_nodes(state_dir) if n != node and read_saves(node_dir(state_dir, n))]
        if others:  # a login node's restore looks at the login node: say where caps are left
            print(f"save files on other nodes: {', '.join(others)} (`wattsweep caps show --all`; "
                  f"`wattsweep caps restore --all --node NODE`)")
    for o in outcomes:
        print(f"{node} GPU {o.index}: {o.status}: {o.detail}")
    # Skipped (its job still runs and will restore it) is not a failure: the epilog must not drain the node for it.
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def _show(state_dir: Path, nodes: list[str]) -> int:
    print(f"state folder: {state_dir}" + ("" if state_dir.exists() else " (does not exist: nothing was capped with it here)"))
    for node in nodes:
        saves = read_saves(node_dir(state_dir, node))
        if not saves:
            print(f"{node}: no save files (no GPU left capped by a killed job)")
        for s in saves:
            now = _limit_now(s, state_dir, node)
            # A running cell's cap is not left behind: it restores it itself when it ends.
            then = ("held by that running process: it restores the cap when it ends" if owner_running(s) else
                    f"restore: wattsweep caps restore --index {s.index}" + (f" --node {node}" if node != node_name() else ""))
            print(f"{node} GPU {s.index} {s.name}: now {now}, previous {s.previous_w:g} W, requested "
                  f"{s.requested_w if s.requested_w is not None else '-'} W; capped by {s.user} (job {s.job_id}, "
                  f"cell {s.cell_id}, pid {s.pid}); {then}")
    return 0


def _limit_now(save, state_dir: Path, node: str) -> str:
    try:
        b = backend_for(save, state_dir, node)
        try:
            return f"{b.get_power_limit_w(save.index):g} W"
        finally:
            b.close()
    except GpuError as exc:
        return f"unknown ({exc})"
