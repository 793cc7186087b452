"""NVML helpers for the decode benchmark: energy counter and a 10 Hz instant-power sampler.

Read-only: nothing here changes a setting of the card.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

NVML_FI_DEV_POWER_INSTANT = 186  # nvml.h; older bindings lack the name


@dataclass
class Nvml:
    """The card at ``index`` through pynvml; ``available`` False where there is no NVML."""

    index: int = 0
    available: bool = False
    name: str = "none"
    _handle: object = None
    _nv: object = None

    @classmethod
    def open(cls, index: int = 0) -> "Nvml":
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            return cls(index, True, name, handle, pynvml)
        except Exception:  # no driver, no library: the benchmark still times
            return cls(index)

    def energy_j(self) -> float | None:
        if not self.available:
            return None
        return self._nv.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def power_instant_w(self) -> float | None:
        if not self.available:
            return None
        field = getattr(self._nv, "NVML_FI_DEV_POWER_INSTANT", NVML_FI_DEV_POWER_INSTANT)
        vals = self._nv.nvmlDeviceGetFieldValues(self._handle, [field])
        if vals[0].nvmlReturn != 0:
            return self._nv.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        return vals[0].value.uiVal / 1000.0

    def power_limit_w(self) -> float | None:
        if not self.available:
            return None
        return self._nv.nvmlDeviceGetEnforcedPowerLimit(self._handle) / 1000.0


@dataclass
class PowerSampler:
    """A thread reading instant power at ``hz`` until stopped."""

    nvml: Nvml
    hz: float = 10.0
    samples: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "PowerSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        period = 1.0 / self.hz
        next_t = time.perf_counter()
        while not self._stop.is_set():
            w = self.nvml.power_instant_w()
            if w is not None:
                self.samples.append((time.perf_counter(), w))
            next_t += period
            self._stop.wait(max(0.0, next_t - time.perf_counter()))

    def mean_w(self) -> float | None:
        return sum(w for _, w in self.samples) / len(self.samples) if self.samples else None
