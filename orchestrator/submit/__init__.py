"""Launching cells: one interface (``base.Launcher``), local and Slurm launchers."""
from orchestrator.submit.base import (
    LaunchError,
    Launcher,
    SubmissionRecord,
    append_submissions,
    get_launcher,
    prepare_cell_dir,
    read_submissions,
    register_launcher,
)

__all__ = [
    "LaunchError",
    "Launcher",
    "SubmissionRecord",
    "append_submissions",
    "get_launcher",
    "prepare_cell_dir",
    "read_submissions",
    "register_launcher",
]
