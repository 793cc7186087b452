"""NVML helpers for the decode benchmark: the energy counter, instant power, the power limit.

Read-only: nothing here changes a setting of the card.
"""
from __future__ import annotations

from dataclasses import dataclass

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
