"""NVIDIA cards through NVML (pynvml, from nvidia-ml-py).

Power: ``NVML_FI_DEV_POWER_INSTANT`` through ``nvmlDeviceGetFieldValues``
where the card has it, else ``nvmlDeviceGetPowerUsage`` (a ~1 s average on
recent cards); ``power_source`` says which ("instant" | "average"), per GPU
in ``power_sources``. The energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
mJ) costs milliseconds a call and is read only by ``energy_j``, never by
``sample``. NVML errors are translated here into GpuError subclasses whose
messages name the fix; nothing above this module sees an NVMLError.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator

from workers.gpu.base import GpuError, GpuInfo, GpuSample, NotSupportedError
from workers.gpu.errors import lost_error, permission_error, range_error
from workers.gpu.simulated import visible_indices

# nvmlFieldValue_t.valueType -> the union member holding the number
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def load_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as exc:
        raise GpuError(f"pynvml is not installed ({exc}); `pip install nvidia-ml-py`, or use gpu.backend=simulated") from None
    return pynvml


class NvmlBackend:
    name = "nvml"
    source = "nvml"

    def __init__(self, *, observe_only: bool = False, module: ModuleType | None = None):
        self.nv = module or load_pynvml()
        self.observe_only = observe_only
        self.would_set: dict[int, float] = {}
        self.power_sources: dict[int, str] = {}
        try:
            self.nv.nvmlInit()
        except self.nv.NVMLError as exc:
            raise GpuError(f"NVML did not initialise ({exc}); is the NVIDIA driver loaded? "
                           f"(`nvidia-smi` should list the GPUs) Else use gpu.backend=simulated") from None
        self._handles: dict[int, Any] = {}
        self._closed = False

    @property
    def power_source(self) -> str:
        """"average" when any GPU read so far lacks the instant-power field."""
        return "average" if "average" in self.power_sources.values() else "instant"

    @contextmanager
    def _nvml(self, index: int, op: str, watts: float | None = None) -> Iterator[None]:
        """Translate NVML errors at the boundary into messages that say what to do."""
        nv = self.nv
        try:
            yield
        except nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == nv.NVML_ERROR_NO_PERMISSION:
                raise permission_error(index, watts or 0.0, f"NVML: {exc}") from None
            if code == nv.NVML_ERROR_INVALID_ARGUMENT and watts is not None:
                lo, hi = self._constraints_w(index)
                raise range_error(index, watts, lo, hi) from None
            if code == nv.NVML_ERROR_GPU_IS_LOST:
                raise lost_error(index, op) from None
            if code == nv.NVML_ERROR_NOT_SUPPORTED:
                raise NotSupportedError(f"GPU {index} does not support {op} (NVML: {exc})") from None
            raise GpuError(f"NVML failed {op} on GPU {index}: {exc}") from None

    def _handle(self, index: int) -> Any:
        h = self._handles.get(index)
        if h is None:
            with self._nvml(index, "opening the device"):
                h = self._handles[index] = self.nv.nvmlDeviceGetHandleByIndex(index)
        return h

    def _constraints_w(self, index: int) -> tuple[float, float]:
        lo, hi = self.nv.nvmlDeviceGetPowerManagementLimitConstraints(self._handle(index))
        return lo / 1000.0, hi / 1000.0

    def devices(self) -> list[GpuInfo]:
        nv = self.nv
        with self._nvml(-1, "counting GPUs"):
            count = nv.nvmlDeviceGetCount()
        uuids = {}
        for i in range(count):
            with self._nvml(i, "reading the uuid"):
                uuids[i] = _text(nv.nvmlDeviceGetUUID(self._handle(i)))
        out = []
        for i in visible_indices(list(range(count)), uuids):
            h = self._handle(i)
            with self._nvml(i, "reading the device constraints"):
                lo, hi = self._constraints_w(i)
                out.append(GpuInfo(i, uuids[i], _text(nv.nvmlDeviceGetName(h)), int(nv.nvmlDeviceGetMemoryInfo(h).total),
                                   lo, hi, nv.nvmlDeviceGetPowerManagementDefaultLimit(h) / 1000.0))
        return out

    def get_power_limit_w(self, index: int) -> float:
        with self._nvml(index, "reading the enforced power limit"):
            return self.nv.nvmlDeviceGetEnforcedPowerLimit(self._handle(index)) / 1000.0

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if self.observe_only:
            self.would_set[index] = float(watts)  # observe mode: record, never write
            return
        with self._nvml(index, "setting the power limit", watts):
            self.nv.nvmlDeviceSetPowerManagementLimit(self._handle(index), int(round(watts * 1000)))

    def _power_w(self, index: int, h: Any) -> float | None:
        nv = self.nv
        if self.power_sources.get(index) != "average":
            try:
                fv = nv.nvmlDeviceGetFieldValues(h, [nv.NVML_FI_DEV_POWER_INSTANT])[0]
                if fv.nvmlReturn == nv.NVML_SUCCESS:
                    self.power_sources[index] = "instant"
                    return float(getattr(fv.value, _VALUE_MEMBERS.get(fv.valueType, "uiVal"))) / 1000.0
            except (nv.NVMLError, AttributeError, IndexError):
                pass  # old driver or card without the field
            self.power_sources[index] = "average"
        return _maybe(nv, lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0)

    def sample(self, index: int) -> GpuSample:
        nv, h = self.nv, self._handle(index)
        t = time.time_ns()
        with self._nvml(index, "sampling"):
            power = self._power_w(index, h)
            util = _maybe(nv, lambda: nv.nvmlDeviceGetUtilizationRates(h))
            mem = _maybe(nv, lambda: nv.nvmlDeviceGetMemoryInfo(h))
            return GpuSample(
                timestamp_ns=t,
                power_w=power,
                sm_util_pct=float(util.gpu) if util is not None else None,
                mem_util_pct=float(util.memory) if util is not None else None,
                mem_used_bytes=int(mem.used) if mem is not None else None,
                sm_clock_mhz=_maybe(nv, lambda: float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))),
                temperature_c=_maybe(nv, lambda: float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))),
                power_limit_w=_maybe(nv, lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0),
            )

    def energy_j(self, index: int) -> float | None:
        with self._nvml(index, "reading the energy counter"):
            return _maybe(self.nv, lambda: self.nv.nvmlDeviceGetTotalEnergyConsumption(self._handle(index)) / 1000.0)

    def note_activity(self, index: int, phase: str, load: float) -> None:
        pass  # a real card measures itself

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self.nv.nvmlShutdown()
            except self.nv.NVMLError:
                pass


def _maybe(nv: ModuleType, read: Any) -> Any:
    """The reading, or None where the card does not support it (other errors,
    GPU lost included, propagate to the translating boundary)."""
    try:
        return read()
    except nv.NVMLError as exc:
        if getattr(exc, "value", None) in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NO_DATA):
            return None
        raise


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def nvml_available() -> bool:
    """True when NVML loads and lists at least one GPU (never raises)."""
    try:
        b = NvmlBackend()
    except GpuError:
        return False
    try:
        return bool(b.devices())
    except GpuError:
        return False
    finally:
        b.close()
