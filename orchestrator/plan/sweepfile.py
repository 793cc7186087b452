"""``sweep.yaml``: what a sweep was made from (resolved config, overrides) and
by whom, where and when. Written once, before anything is submitted."""
from __future__ import annotations

import getpass
import socket
import sys
import time
from typing import Any

import yaml

from orchestrator.contracts import TOOL_NAME, SweepPaths, atomic_write_bytes


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version(TOOL_NAME)
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def sweep_record(composed: Any, n_planned: int, n_feasible: int) -> dict[str, Any]:
    return {
        "tool": TOOL_NAME,
        "tool_version": tool_version(),
        "created_unix_s": time.time(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "cwd": composed.cwd,
        "python": sys.version.split()[0],
        "command": "wattsweep sweep" + (" -m" if composed.multirun else "") + "".join(f" {o}" for o in composed.overrides),
        "overrides": list(composed.overrides),
        "multirun": composed.multirun,
        "launcher": composed.launcher_name,
        "cells": {"planned": n_planned, "feasible": n_feasible, "infeasible": n_planned - n_feasible},
        "config": dict(composed.config),  # the first cell's resolved config
    }


def write_sweep_yaml(paths: SweepPaths, composed: Any, n_planned: int, n_feasible: int) -> None:
    text = yaml.safe_dump(sweep_record(composed, n_planned, n_feasible), sort_keys=False, default_flow_style=False)
    atomic_write_bytes(paths.sweep_yaml, text.encode())


def read_sweep_yaml(paths: SweepPaths) -> dict[str, Any]:
    with open(paths.sweep_yaml, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}
