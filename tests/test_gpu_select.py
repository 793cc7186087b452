"""Backend selection, rank → GPU mapping, the simulated power model, the fake nvidia-smi."""
from __future__ import annotations

import time

import pytest

from fakes.gpu_rig import Rig, isolate
from orchestrator.contracts import GPU_PROFILES
from workers.gpu import gpu_index_for_rank, select_backend
from workers.gpu.base import GpuBackend, GpuError
from workers.gpu.nvidia_smi import NvidiaSmiBackend
from workers.gpu.nvml import nvml_available


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Rig:
    return Rig("simulated", tmp_path, isolate(monkeypatch, tmp_path))


@pytest.mark.skipif(nvml_available(), reason="a real GPU answers here: auto picks NVML")
def test_auto_without_a_gpu_is_the_simulated_node(rig):
    b = select_backend(rig.options(gpu_backend="auto"))
    assert b.name == "simulated" and isinstance(b, GpuBackend)


def test_unknown_backend_and_fault_say_the_valid_choices(rig):
    with pytest.raises(GpuError, match="valid: auto, nvml"):
        select_backend(rig.options(gpu_backend="magic"))
    with pytest.raises(GpuError, match="valid: permission"):
        select_backend(rig.options(gpu_fail="melt"))
    with pytest.raises(GpuError, match="needs gpu.backend=simulated"):
        select_backend(rig.options(gpu_backend="nvidia-smi", gpu_fail="lost"))


def test_simulated_node_has_the_profile_cards(rig):
    select_backend(rig.options()).set_power_limit_w(0, 200)  # a V100 node was used first
    b = select_backend(rig.options(gpu_profile="h100"))
    devs = b.devices()
    p = GPU_PROFILES["h100"]
    assert len(devs) == p.gpus_per_node and devs[0].max_limit_w == p.max_limit_w
    assert devs[0].name == p.name and b.get_power_limit_w(0) == p.default_limit_w
    assert len({d.uuid for d in devs}) == len(devs)
    # each profile is its own simulated node: the V100 node kept its cap
    assert select_backend(rig.options()).get_power_limit_w(0) == 200


def test_rank_to_gpu_follows_cuda_visible_devices(rig, monkeypatch):
    b = select_backend(rig.options())
    assert gpu_index_for_rank(b, 3) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [gpu_index_for_rank(b, r) for r in (0, 1)] == [4, 6]
    with pytest.raises(GpuError, match="local rank 2 has no GPU"):
        gpu_index_for_rank(b, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert gpu_index_for_rank(b, 1) == 5  # one GPU bound per task: that one


def test_simulated_power_model_is_clipped_by_the_cap_and_integrates_energy(rig):
    b = select_backend(rig.options())
    idle = b.sample(0)
    assert idle.power_w == GPU_PROFILES["v100"].idle_power_w and idle.sm_util_pct == 0
    b.note_activity(0, "decode", 1.0)
    assert b.sample(0).power_w == 300.0
    b.set_power_limit_w(0, 150)
    s = b.sample(0)
    assert s.power_w == 150.0 and s.power_limit_w == 150.0 and s.sm_clock_mhz < 1530
    e0 = b.energy_j(0)
    time.sleep(0.2)
    assert b.energy_j(0) - e0 == pytest.approx(150 * 0.2, rel=0.25)
    b.note_activity(0, "decode", 0.1)  # demand 66 W: under the cap, not clipped
    assert b.sample(0).power_w == pytest.approx(40 + 0.1 * 260)


def test_simulated_state_outlives_the_process_object(rig):
    select_backend(rig.options()).set_power_limit_w(2, 200)
    assert select_backend(rig.options()).get_power_limit_w(2) == 200


def test_nvidia_smi_backend_reads_the_fake(rig):
    rig.sim().note_activity(1, "decode", 1.0)
    b = NvidiaSmiBackend()
    d = b.devices()[1]
    assert d.max_limit_w == 300 and d.memory_total_bytes == 32 << 30 and d.uuid == rig.sim().devices()[1].uuid
    s = b.sample(1)
    assert s.power_w == pytest.approx(300.0) and s.sm_util_pct == 100 and s.power_limit_w == 300
    assert b.energy_j(1) is None


def test_nvidia_smi_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(GpuError, match="nvidia-smi is not on PATH"):
        NvidiaSmiBackend().devices()
