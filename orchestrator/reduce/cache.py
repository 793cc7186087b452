"""The validation cache: ``results/.validation-cache.json``.

A verdict (and, for the reducer, the cell's summary row) is kept under a key
made of the (size, mtime_ns) of DONE.json and of every file it lists: a cell
whose files did not change is not hashed or decoded again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.contracts import DONE_NAME, SweepPaths, atomic_write_bytes
from orchestrator.reduce.files import read_with_stat

CACHE_NAME = ".validation-cache.json"
# Bump when a check is added: verdicts of the earlier checks are judged again.
CACHE_VERSION = 3


def stat_key(paths: SweepPaths, cell_id: str) -> list[Any] | None:
    """(size, mtime_ns) of DONE.json and of every file it lists; None if any is missing.

    The same key StatKey gathers while checking, here without reading the
    listed files: what a cache hit costs."""
    cdir = str(paths.cell_dir(cell_id))
    try:
        done_raw, st = read_with_stat(f"{cdir}/{DONE_NAME}")
        rels = sorted(json.loads(done_raw).get("files", {}))
        key: list[Any] = [[st.st_size, st.st_mtime_ns]]
        for rel in rels:
            s = os.stat(f"{cdir}/{rel}")
            key.append([rel, s.st_size, s.st_mtime_ns])
        return key
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def cache_path(paths: SweepPaths) -> Path:
    return paths.results_dir / CACHE_NAME


def load_cache(paths: SweepPaths) -> dict[str, Any]:
    try:
        raw = json.loads(cache_path(paths).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION:
        return {}
    cells = raw.get("cells")
    return dict(cells) if isinstance(cells, dict) else {}


def save_cache(paths: SweepPaths, cells: dict[str, Any]) -> None:
    try:
        data = json.dumps({"version": CACHE_VERSION, "cells": cells}, sort_keys=True, separators=(",", ":"))
        atomic_write_bytes(cache_path(paths), data.encode(), fsync=False)  # a cache: losing it costs only time
    except OSError:
        pass  # a read-only sweep folder still validates, only slower next time
