"""The GPU device layer: one interface for power-cap control and telemetry.

Backends (``nvml``, ``nvidia_smi``, ``capctl``, ``simulated``) implement
``GpuBackend``. Errors from a vendor library are translated at the boundary
into ``GpuError`` subclasses whose message says what to do.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, runtime_checkable


class GpuError(RuntimeError):
    """A GPU operation failed; the message names the fix."""


class CapPermissionError(GpuError):
    """Setting the power limit needs root or a privileged helper."""


class CapRangeError(GpuError):
    """The requested limit is outside the card's allowed range."""


class CapMismatchError(GpuError):
    """The enforced limit differs from the requested one."""


class GpuLostError(GpuError):
    """The GPU stopped answering (fell off the bus, driver reset)."""


class NotSupportedError(GpuError):
    """The card or driver does not support this query or setting."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    min_limit_w: float
    max_limit_w: float
    default_limit_w: float


@dataclass(frozen=True)
class GpuSample:
    """One telemetry reading of one GPU. ``None`` where the card cannot say."""

    timestamp_ns: int
    power_w: float | None
    sm_util_pct: float | None
    mem_util_pct: float | None
    mem_used_bytes: int | None
    sm_clock_mhz: float | None
    temperature_c: float | None
    power_limit_w: float | None


@runtime_checkable
class GpuBackend(Protocol):
    name: str  # "nvml" | "nvidia-smi" | "capctl" | "simulated"
    source: str  # telemetry label written to every row: "nvml" | "simulated"
    observe_only: bool  # True: set_power_limit_w records and never writes

    def devices(self) -> list[GpuInfo]:
        """The GPUs this process may use (CUDA_VISIBLE_DEVICES respected)."""
        ...

    def get_power_limit_w(self, index: int) -> float:
        """The enforced power limit now."""
        ...

    def set_power_limit_w(self, index: int, watts: float) -> None:
        """Set the limit; raises CapPermissionError / CapRangeError / GpuLostError."""
        ...

    def sample(self, index: int) -> GpuSample:
        """A fast reading (microseconds on NVML): never the energy counter."""
        ...

    def energy_j(self, index: int) -> float | None:
        """The card's cumulative energy counter in joules, None if it has none.
        Slow on NVML (~3.5 ms): call at phase boundaries and at ~1 Hz only."""
        ...

    def note_activity(self, index: int, phase: str, load: float) -> None:
        """Tell the backend what the worker is doing (phase, 0..1 load).
        Real backends ignore it; the simulated one drives its power model."""
        ...

    def close(self) -> None: ...


# -- signal handlers and a backend's critical sections ---------------------
# Python runs signal handlers in the main thread between two of its steps,
# so a handler can interrupt a backend in the middle of a read-modify-write
# under a lock (the simulated node's state file). The cap session's handler
# restores caps through the same backend: it would wait for the lock that the
# code it interrupted holds. Inside such a section the handler's work is
# queued instead and runs as the section ends, lock released.
_critical_depth = 0
_queued: list[Callable[[], None]] = []


@contextmanager
def handlers_wait() -> Iterator[None]:
    """A section a signal handler must not interrupt (main thread only: other
    threads never run handlers, and the handler may wait for their locks)."""
    global _critical_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth:
            while _queued:
                _queued.pop(0)()


def run_or_queue(handler: Callable[[], None]) -> bool:
    """Queue ``handler`` when the main thread is inside ``handlers_wait``
    (it runs when the section ends); True if it was queued."""
    if _critical_depth:
        _queued.append(handler)
        return True
    return False
