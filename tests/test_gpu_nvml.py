"""The NVML backend against a fake pynvml: readings, fallbacks, error translation."""
from __future__ import annotations

import types

import pytest

from workers.gpu.base import CapPermissionError, CapRangeError, GpuError, GpuLostError, NotSupportedError
from workers.gpu.nvml import NvmlBackend

SUCCESS, INVALID_ARGUMENT, NOT_SUPPORTED, NO_PERMISSION, GPU_IS_LOST, NO_DATA = 0, 2, 3, 4, 15, 21


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(cards: list[dict]) -> types.ModuleType:
    """A pynvml stand-in: each card a dict of readings in NVML units (mW, mJ);
    ``None`` means the card does not support that reading; ``calls`` records
    every call by name."""
    nv = types.ModuleType("pynvml")
    nv.calls = []
    nv.NVMLError = NVMLError
    nv.NVML_SUCCESS, nv.NVML_ERROR_INVALID_ARGUMENT, nv.NVML_ERROR_NOT_SUPPORTED = SUCCESS, INVALID_ARGUMENT, NOT_SUPPORTED
    nv.NVML_ERROR_NO_PERMISSION, nv.NVML_ERROR_GPU_IS_LOST, nv.NVML_ERROR_NO_DATA = NO_PERMISSION, GPU_IS_LOST, NO_DATA
    nv.NVML_FI_DEV_POWER_INSTANT, nv.NVML_CLOCK_SM, nv.NVML_TEMPERATURE_GPU = 186, 1, 0

    def api(name):
        def deco(fn):
            def wrapped(*a):
                nv.calls.append(name)
                return fn(*a)
            setattr(nv, name, wrapped)
            return wrapped
        return deco

    def card(h):
        if h.get("lost"):
            raise NVMLError(GPU_IS_LOST)
        return h

    def value(h, key):
        v = card(h)[key]
        if v is None:
            raise NVMLError(NOT_SUPPORTED)
        return v

    api("nvmlInit")(lambda: None)
    api("nvmlShutdown")(lambda: None)
    api("nvmlDeviceGetCount")(lambda: len(cards))
    api("nvmlDeviceGetHandleByIndex")(lambda i: cards[i])
    api("nvmlDeviceGetUUID")(lambda h: value(h, "uuid"))
    api("nvmlDeviceGetName")(lambda h: value(h, "name").encode())  # old bindings return bytes
    api("nvmlDeviceGetMemoryInfo")(lambda h: types.SimpleNamespace(total=80 << 30, used=value(h, "mem_used")))
    api("nvmlDeviceGetPowerManagementLimitConstraints")(lambda h: (value(h, "min_mw"), value(h, "max_mw")))
    api("nvmlDeviceGetPowerManagementDefaultLimit")(lambda h: value(h, "max_mw"))
    api("nvmlDeviceGetEnforcedPowerLimit")(lambda h: value(h, "limit_mw"))
    api("nvmlDeviceGetPowerUsage")(lambda h: value(h, "avg_mw"))
    api("nvmlDeviceGetTotalEnergyConsumption")(lambda h: value(h, "energy_mj"))
    api("nvmlDeviceGetUtilizationRates")(lambda h: types.SimpleNamespace(gpu=value(h, "util"), memory=40))
    api("nvmlDeviceGetClockInfo")(lambda h, kind: value(h, "clock"))
    api("nvmlDeviceGetTemperature")(lambda h, kind: value(h, "temp"))

    @api("nvmlDeviceGetFieldValues")
    def field_values(h, ids):
        inst = card(h)["inst_mw"]
        fv = types.SimpleNamespace(nvmlReturn=SUCCESS if inst is not None else NOT_SUPPORTED, valueType=1,
                                   value=types.SimpleNamespace(uiVal=inst or 0))
        return [fv]

    @api("nvmlDeviceSetPowerManagementLimit")
    def set_limit(h, mw):
        card(h)
        if h.get("deny"):
            raise NVMLError(NO_PERMISSION)
        if not h["min_mw"] <= mw <= h["max_mw"]:
            raise NVMLError(INVALID_ARGUMENT)
        h["limit_mw"] = mw

    return nv


def h200(**kw):
    base = dict(uuid="GPU-aaaa", name="NVIDIA H200", mem_used=1 << 30, min_mw=200_000, max_mw=700_000,
                limit_mw=700_000, avg_mw=310_000, inst_mw=455_500, energy_mj=123_456_789, util=97, clock=1980, temp=51)
    return {**base, **kw}


@pytest.fixture
def nv(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # card 0 has everything; card 1 has no energy counter and no instant-power field
    return fake_pynvml([h200(), h200(uuid="GPU-bbbb", inst_mw=None, energy_mj=None)])


def test_devices_and_constraints(nv):
    b = NvmlBackend(module=nv)
    d0, d1 = b.devices()
    assert (d0.index, d0.uuid, d0.name, d0.min_limit_w, d0.max_limit_w, d0.default_limit_w) == (
        0, "GPU-aaaa", "NVIDIA H200", 200.0, 700.0, 700.0)
    assert d1.uuid == "GPU-bbbb"


def test_cuda_visible_devices_by_index_and_uuid(nv, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.index for d in NvmlBackend(module=nv).devices()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,GPU-aaaa")
    assert [d.index for d in NvmlBackend(module=nv).devices()] == [1, 0]


def test_sample_uses_instant_power_and_fills_every_field_without_the_energy_counter(nv):
    b = NvmlBackend(module=nv)
    s = b.sample(0)
    assert s.power_w == pytest.approx(455.5) and b.power_sources[0] == "instant" and b.power_source == "instant"
    assert (s.sm_util_pct, s.mem_util_pct, s.mem_used_bytes, s.sm_clock_mhz, s.temperature_c, s.power_limit_w) == (
        97.0, 40.0, 1 << 30, 1980.0, 51.0, 700.0)
    assert "nvmlDeviceGetTotalEnergyConsumption" not in nv.calls  # ms per call: never on the sample path
    assert "nvmlDeviceGetPowerUsage" not in nv.calls


def test_card_without_instant_field_falls_back_to_average_and_says_so(nv):
    b = NvmlBackend(module=nv)
    assert b.sample(1).power_w == pytest.approx(310.0)
    assert b.power_sources[1] == "average" and b.power_source == "average"
    nv.calls.clear()
    b.sample(1)
    assert "nvmlDeviceGetFieldValues" not in nv.calls  # the fallback sticks: no failing call per sample


def test_energy_counter_in_joules_and_none_without_one(nv):
    b = NvmlBackend(module=nv)
    assert b.energy_j(0) == pytest.approx(123_456.789)
    assert b.energy_j(1) is None


def test_unsupported_readings_are_none(monkeypatch):
    nv = fake_pynvml([h200(util=None, clock=None, temp=None)])
    s = NvmlBackend(module=nv).sample(0)
    assert (s.sm_util_pct, s.sm_clock_mhz, s.temperature_c) == (None, None, None) and s.power_w is not None


def test_set_and_read_back(nv):
    b = NvmlBackend(module=nv)
    b.set_power_limit_w(0, 350)
    assert b.get_power_limit_w(0) == 350.0


def test_no_permission_names_the_fixes():
    nv = fake_pynvml([h200(deny=True)])
    with pytest.raises(CapPermissionError) as err:
        NvmlBackend(module=nv).set_power_limit_w(0, 300)
    assert "root" in str(err.value) and "wattsweep-capctl" in str(err.value) and "docs/admin.md" in str(err.value)


def test_invalid_argument_is_a_range_error_with_the_cards_range(nv):
    with pytest.raises(CapRangeError, match="200-700 W"):
        NvmlBackend(module=nv).set_power_limit_w(0, 100)


def test_lost_gpu(nv):
    b = NvmlBackend(module=nv)
    b.devices()
    nv.nvmlDeviceGetHandleByIndex(0)["lost"] = True
    with pytest.raises(GpuLostError, match="lost"):
        b.sample(0)
    with pytest.raises(GpuLostError):
        b.get_power_limit_w(0)


def test_not_supported_limit_and_init_failure():
    nv = fake_pynvml([h200(limit_mw=None)])
    with pytest.raises(NotSupportedError):
        NvmlBackend(module=nv).get_power_limit_w(0)

    def boom():
        raise NVMLError(9)

    nv.nvmlInit = boom
    with pytest.raises(GpuError, match="driver"):
        NvmlBackend(module=nv)


def test_observe_mode_never_calls_the_setter(nv):
    b = NvmlBackend(module=nv, observe_only=True)
    b.set_power_limit_w(0, 300)
    assert "nvmlDeviceSetPowerManagementLimit" not in nv.calls and b.would_set == {0: 300.0}
    assert b.get_power_limit_w(0) == 700.0
