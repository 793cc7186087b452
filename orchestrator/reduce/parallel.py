"""Map a function over cells on all cores, in order, with bounded memory.

Reducing a cell is mostly per-file fixed cost in Python and pyarrow, so threads
share one core's worth of GIL; processes use them all. Small batches run in
this process: starting workers costs more than they would save.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterator, Sequence

MIN_ITEMS_FOR_PROCESSES = 64


def worker_count() -> int:
    return max(1, os.cpu_count() or 1)


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], *, init: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[Any]:
    """fn over items, results in item order. ``init(*initargs)`` runs once per
    worker (and once here when running inline) to set up shared read-only state."""
    n = worker_count()
    if n == 1 or len(items) < MIN_ITEMS_FOR_PROCESSES:
        if init is not None:
            init(*initargs)
        yield from map(fn, items)
        return
    # fork is cheap and inherits imports; with other threads alive it can
    # deadlock in the child, so fall back to a clean interpreter then.
    method = "fork" if threading.active_count() == 1 and "fork" in mp.get_all_start_methods() else "spawn"
    # Small chunks: the last chunk of one worker is what the other waits for
    # at the end (32 cells were ~0.4 s of one core); a chunk's pickling costs
    # far less than a cell.
    chunk = max(1, min(8, len(items) // (n * 32)))
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(method), initializer=init, initargs=initargs) as pool:
        yield from pool.map(fn, items, chunksize=chunk)
