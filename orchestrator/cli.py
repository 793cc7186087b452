"""``wattsweep``: the login-node command line.

Each subcommand lives in its room and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so
``wattsweep --help`` and ``wattsweep status`` stay fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sweep": ("orchestrator.submit.sweep_cmd", "plan a sweep from Hydra overrides and launch its cells (returns once queued)"),
    "status": ("orchestrator.status.cmd", "show each cell's state from the sweep folder and the queue"),
    "resubmit": ("orchestrator.status.resubmit_cmd", "resubmit only failed, cancelled, timed-out, missing or invalid cells"),
    "cancel": ("orchestrator.status.cancel_cmd", "stop a sweep's pending and running cells (scancel, local runner)"),
    "logs": ("orchestrator.status.logs_cmd", "print the end of a cell's job logs (stderr, stdout) for one rank"),
    "reduce": ("orchestrator.reduce.cmd", "validate cell outputs and write results/summary.parquet"),
    "report": ("orchestrator.report.cmd", "write report/index.html (and index.md) with the paper's figures"),
    "compare": ("orchestrator.report.compare_cmd", "side-by-side ratios of matching cells of two sweeps"),
    "audit": ("orchestrator.audit.cmd", "audit power-cap ledgers: changes, GPUs left capped, policy breaches"),
    "caps": ("orchestrator.audit.caps_cmd", "show or restore power caps on this node from their save files"),
    "doctor": ("orchestrator.audit.doctor_cmd", "say whether power caps can be set on this node, and how"),
}

EPILOG = """examples:
  wattsweep sweep -m +experiment=smoke --wait      four tiny cells in seconds (local, simulated GPU without one)
  wattsweep sweep -m shards=1,2 batch_size=1,4 n_prompts=16 max_new_tokens=32 --wait
  wattsweep sweep -m model=llama-7b shards=1,2,4 power_cap_w=null,250,175,150 launcher=slurm
  wattsweep status SWEEP_DIR          wattsweep resubmit SWEEP_DIR
  wattsweep cancel SWEEP_DIR          wattsweep logs SWEEP_DIR CELL
  wattsweep reduce SWEEP_DIR          wattsweep report SWEEP_DIR
  wattsweep audit --ledger SWEEP_DIR  wattsweep doctor

Run `wattsweep COMMAND --help` for a command's options."""


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wattsweep",
        description="Slurm-native sweeps that measure what LLM inference costs in watts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}")
        args = parser.parse_args(argv)
        if args.version:
            from importlib.metadata import version

            print(f"wattsweep {version('wattsweep')}")
            return 0
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"wattsweep {name}",
        description=getattr(module, "DESCRIPTION", help_text),
        epilog=getattr(module, "EPILOG", None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    except OSError as e:
        # A file or folder the command could not read or write (permissions,
        # a file where a folder belongs, a full disk): one line naming it.
        if os.environ.get("WATTSWEEP_TRACEBACK"):
            raise
        print(f"wattsweep {name}: {_os_error(e)} (WATTSWEEP_TRACEBACK=1 shows where)", file=sys.stderr)
        return 1


def key_values(items: list[str] | tuple[str, ...], example: str) -> dict:
    """["power_cap_w=150", "dataset=alpaca"] -> {"power_cap_w": 150, "dataset": "alpaca"}:
    values read as JSON (numbers, null, lists), else as text. ValueError names
    an item that is not KEY=VALUE, with ``example``."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE (e.g. {example})")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _os_error(e: OSError) -> str:
    if e.filename is None:
        return str(e) or type(e).__name__
    where = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{e.strerror or type(e).__name__}: {where}"


def _reader_went_away() -> int:
    """The reader of the output closed it (``wattsweep status DIR | head``):
    stop quietly, as Unix tools do. stdout is pointed at /dev/null so that
    Python's flush at exit does not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


if __name__ == "__main__":
    sys.exit(main())
