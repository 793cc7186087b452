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
# Items per round trip to a worker while much work is left: a round trip
# (pickling the ids and the results, two queue hops) costs far less than a cell.
MAX_CHUNK = 8


def worker_count() -> int:
    """The CPUs this process may run on (a Slurm job or a container may have
    fewer than the machine), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def chunk_sizes(n_items: int, n_workers: int) -> list[int]:
    """Sizes of consecutive chunks covering n_items: MAX_CHUNK while much is
    left, shrinking to 1 at the end. The last chunk a worker takes is what the
    others wait for when they run out of work; with fixed chunks of 8 that was
    up to 8 cells (~0.1 s) of one core idle at the end of every reduce."""
    sizes, left = [], n_items
    while left > 0:
        size = max(1, min(MAX_CHUNK, left // (4 * n_workers)))
        sizes.append(size)
        left -= size
    return sizes


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
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context(method), initializer=init, initargs=initargs) as pool:
        futures, start = [], 0
        for size in chunk_sizes(len(items), n):
            futures.append(pool.submit(_apply, fn, items[start:start + size]))
            start += size
        try:
            for fut in futures:
                yield from fut.result()
        finally:  # stopped early (an error, the caller gave up): don't run what is left
            for fut in futures:
                fut.cancel()


def _apply(fn: Callable[[Any], Any], chunk: Sequence[Any]) -> list[Any]:
    return [fn(x) for x in chunk]
