"""One telemetry sampler thread per GPU.

The thread reads the backend's fast sample (instant power, utilisation, clocks)
at ``hz`` and the slow energy counter at ``energy_hz``. The worker marks phase
boundaries from its own thread after a device synchronise; each mark reads the
energy counter at that instant so that phase and window energies come from the
counter, not from integrating sampled power.

No torch here: the worker owns the device and synchronises it before calling
``mark``/``window_start``/``window_end``.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.telemetry.writer import TelemetryRows, write_telemetry

# Smallest rate that still resolves the phases of a decode run (>= 10 Hz).
MIN_HZ = 10.0


@dataclass(frozen=True)
class WindowMark:
    """A measured-window bound: node clock and energy counter since start."""

    timestamp_ns: int
    energy_j: float | None


class Sampler:
    """Background sampler of one GPU; rows are tagged with the current phase."""

    def __init__(
        self,
        backend: Any,
        gpu_index: int,
        *,
        cell_id: str,
        host: str,
        rank: int,
        gpu_uuid: str,
        hz: float = 10.0,
        energy_hz: float = 1.0,
    ) -> None:
        if hz < MIN_HZ:
            raise ValueError(f"telemetry rate {hz} Hz is too slow; use at least {MIN_HZ:g} Hz")
        if energy_hz <= 0:
            raise ValueError(f"energy counter rate must be positive, got {energy_hz}")
        self._backend = backend
        self._index = int(gpu_index)
        self._period_s = 1.0 / float(hz)
        self._energy_period_s = 1.0 / float(energy_hz)
        self._rows = TelemetryRows(
            cell_id=cell_id, host=host, rank=rank, gpu_index=gpu_index, gpu_uuid=gpu_uuid,
            source=str(getattr(backend, "source", "unknown")),
        )
        # One lock around every backend call and row append: the worker's marks
        # and the thread must not interleave half-written rows.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._energy_now = threading.Event()  # a mark asks the thread for a counter read
        self._thread: threading.Thread | None = None
        self._phase = "load"
        self._phases: list[dict[str, Any]] = []
        self._energy_base_j: float | None = None
        self._has_counter = False
        self._window_start: WindowMark | None = None
        self._window_end: WindowMark | None = None
        self._error: str | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        with self._lock:
            raw = self._read_energy_raw()
            self._has_counter = raw is not None
            self._energy_base_j = raw
            now = time.time_ns()
            self._phases.append({"phase": self._phase, "start_ns": now, "end_ns": None})
            self._take_row(with_energy=True, energy_raw=raw)
        self._thread = threading.Thread(target=self._loop, name=f"telemetry-gpu{self._index}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._energy_now.set()  # wake the thread so it sees the stop at once
        self._thread.join()
        with self._lock:
            if self._error is None:
                try:
                    self._take_row(with_energy=True)
                except Exception as e:  # noqa: BLE001 - stop() runs in finally blocks: never raise
                    self._error = f"{type(e).__name__}: {e}"
            # The backend's clock (the rows' clock) closes the last phase.
            ts = self._rows.timestamp_ns
            self._close_phase(ts[-1] if ts else time.time_ns())

    # -- worker-side marks -------------------------------------------------

    def mark(self, phase: str, *, load: float = 0.0) -> None:
        """Phase boundary: the caller has synchronised the device."""
        with self._lock:
            now = self._take_row(with_energy=False)
            self._close_phase(now)
            self._phase = phase
            self._phases.append({"phase": phase, "start_ns": now, "end_ns": None})
            # The boundary row belongs to the phase that starts here.
            self._rows.phase[-1] = phase
        self._backend.note_activity(self._index, phase, float(load))
        # The counter read (~3.5 ms on NVML) happens on the sampler thread, woken
        # now: a per-batch mark must not put it on the worker's decode path.
        # Window bounds (window_start/window_end) still read it synchronously.
        if self._thread is not None:
            self._energy_now.set()
        else:
            with self._lock:
                self._take_row(with_energy=True)

    def window_start(self) -> None:
        with self._lock:
            now = self._take_row(with_energy=True)
            self._window_start = WindowMark(now, self._rows.energy_j[-1])

    def window_end(self) -> None:
        with self._lock:
            now = self._take_row(with_energy=True)
            self._window_end = WindowMark(now, self._rows.energy_j[-1])

    # -- output ------------------------------------------------------------

    @property
    def rows(self) -> int:
        return len(self._rows.timestamp_ns)

    @property
    def error(self) -> str | None:
        """Why the thread stopped early (the GPU stopped answering), else None."""
        return self._error

    def metadata(self, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
        ws, we = self._window_start, self._window_end
        meta: dict[str, Any] = {
            "window_start_ns": ws.timestamp_ns if ws else None,
            "window_end_ns": we.timestamp_ns if we else None,
            "energy_start_j": ws.energy_j if ws else None,
            "energy_end_j": we.energy_j if we else None,
            "phases": [dict(p) for p in self._phases],
            "power_source": str(getattr(self._backend, "power_source", "instant")),
            "gpu_name": self._gpu_name(),
            "sample_period_s": self._period_s,
            "energy_period_s": self._energy_period_s,
            "has_energy_counter": self._has_counter,
            "sampler_error": self._error,
        }
        meta.update(extra_meta or {})
        return meta

    def write(self, path: Path, extra_meta: dict[str, Any]) -> int:
        """Atomic Parquet (contracts.TELEMETRY_SCHEMA); returns the row count."""
        with self._lock:
            meta = self.metadata(extra_meta)
            return write_telemetry(Path(path), self._rows, meta)

    # -- internals ---------------------------------------------------------

    def _loop(self) -> None:
        # The energy read (~3.5 ms on NVML) rides on a power tick, right after
        # its sample, so at 10 Hz it delays no sample by more than its own cost.
        next_power = time.monotonic() + self._period_s
        next_energy = time.monotonic() + self._energy_period_s
        while True:
            woken = self._energy_now.wait(max(0.0, next_power - time.monotonic()))
            if self._stop.is_set():
                return
            if woken:  # a phase mark: read the counter now, keep the power cadence
                self._energy_now.clear()
                if not self._thread_row(with_energy=True):
                    return
                continue
            now = time.monotonic()
            want_energy = now >= next_energy
            if not self._thread_row(with_energy=want_energy):
                return
            if want_energy:
                next_energy += self._energy_period_s
                if next_energy < now:  # fell behind (suspended process): do not burst
                    next_energy = now + self._energy_period_s
            next_power += self._period_s
            if next_power < time.monotonic():
                # Late (energy read or a stall): keep the cadence, skip missed ticks.
                next_power = time.monotonic() + self._period_s

    def _thread_row(self, *, with_energy: bool) -> bool:
        """One row from the sampler thread; False, with the error kept, once the GPU
        stops answering (a lost GPU must not kill the worker's thread silently)."""
        try:
            with self._lock:
                self._take_row(with_energy=with_energy)
        except Exception as e:  # noqa: BLE001 - any backend failure ends sampling the same way
            self._error = f"{type(e).__name__}: {e}"
            return False
        return True

    def _read_energy_raw(self) -> float | None:
        try:
            return self._backend.energy_j(self._index)
        except Exception:  # noqa: BLE001 - a card without a counter may raise NotSupported
            return None

    def _take_row(self, *, with_energy: bool, energy_raw: float | None = None) -> int:
        """Append one sample row (lock held); returns its timestamp."""
        s = self._backend.sample(self._index)
        energy: float | None = None
        if with_energy and self._has_counter:
            raw = energy_raw if energy_raw is not None else self._read_energy_raw()
            if raw is not None and self._energy_base_j is not None:
                energy = raw - self._energy_base_j
        ts = int(s.timestamp_ns) if s.timestamp_ns else time.time_ns()
        self._rows.append(ts, self._phase, s, energy)
        return ts

    def _close_phase(self, now_ns: int) -> None:
        if self._phases and self._phases[-1]["end_ns"] is None:
            self._phases[-1]["end_ns"] = now_ns

    def _gpu_name(self) -> str | None:
        try:
            for info in self._backend.devices():
                if info.index == self._index:
                    return info.name
        except Exception:  # noqa: BLE001 - the name is a label, never worth failing a cell
            return None
        return None
