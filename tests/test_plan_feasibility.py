"""Feasibility: heads and widths divisible by shards, memory fit, cap range, policy."""
from __future__ import annotations

import os
import sys
import types
from dataclasses import replace

import pytest

from orchestrator.config import compose_cells
from orchestrator.contracts import GPU_PROFILES
from orchestrator.plan import plan_cells
from orchestrator.plan.feasibility import PolicyError, infeasible_reason, memory_needed_bytes, nodes_for, parameter_count


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one(overrides):
    return compose_cells(overrides, multirun=False).cells[0].params


@pytest.mark.parametrize("model,billions", [("llama-7b", 6.74), ("llama-13b", 13.02), ("llama-33b", 32.53),
                                            ("llama-65b", 65.29), ("llama2-70b", 68.98)])
def test_parameter_counts_match_the_published_models(in_tmp, model, billions):
    assert parameter_count(one([f"model={model}"]).model_args) / 1e9 == pytest.approx(billions, abs=0.01)


def test_shards_must_divide_heads(in_tmp):
    reason = infeasible_reason(one(["shards=3"]), GPU_PROFILES["v100"])
    assert reason.startswith("shards=3 does not divide n_heads=4 of llama-tiny")
    assert "valid shard counts: 1, 2, 4" in reason


def test_kv_heads_limit_shards(in_tmp):
    reason = infeasible_reason(one(["model=llama2-70b", "shards=16", "batch_size=1"]), GPU_PROFILES["h100"])
    assert "n_kv_heads=8" in reason


def test_memory_fit(in_tmp):
    # 65B in fp16 is ~122 GiB of weights alone: never on one 32 GiB card, fine on eight.
    p1 = one(["model=llama-65b", "shards=1", "batch_size=1"])
    assert "needs" in infeasible_reason(p1, GPU_PROFILES["v100"])
    assert infeasible_reason(replace(p1, shards=8, batch_size=64), GPU_PROFILES["v100"]) is None
    # The KV cache counts: 7B on one V100 fits at batch 64 x 512 tokens, not at batch 128.
    p7 = one(["model=llama-7b", "batch_size=64"])
    assert infeasible_reason(p7, GPU_PROFILES["v100"]) is None
    assert "needs" in infeasible_reason(replace(p7, batch_size=128), GPU_PROFILES["v100"])
    assert memory_needed_bytes(replace(p7, dtype="float32")) > memory_needed_bytes(p7)


def test_cap_outside_card_range(in_tmp):
    reason = infeasible_reason(one(["power_cap_w=50"]), GPU_PROFILES["v100"])
    assert reason == "power_cap_w=50 outside v100's range 100-300 W"
    assert infeasible_reason(one(["power_cap_w=150"]), GPU_PROFILES["v100"]) is None
    assert "outside h100's range" in infeasible_reason(one(["power_cap_w=150", "gpu.profile=h100"]), GPU_PROFILES["h100"])


def test_sequence_longer_than_model_allows(in_tmp):
    reason = infeasible_reason(one(["max_prompt_tokens=1000", "max_new_tokens=100"]), GPU_PROFILES["v100"])
    assert "exceeds llama-tiny's max_seq_len=1024" in reason


def test_plan_keeps_infeasible_cells_with_reasons_and_collapses_duplicates(in_tmp):
    sweep = compose_cells(["shards=1,3,1", "power_cap_w=150,50"], multirun=True)
    cells = plan_cells(sweep)
    assert len(sweep.cells) == 6 and len(cells) == 4
    feasible = {(c.params.shards, c.params.power_cap_w) for c in cells if c.feasible}
    assert feasible == {(1, 150.0)}
    assert all(c.reason for c in cells if not c.feasible)


def test_nodes_span_for_slurm(in_tmp):
    assert nodes_for(2, {"name": "slurm", "gpus_per_node": 1}) == 2
    assert nodes_for(32, {"name": "slurm", "gpus_per_node": 8}) == 4
    assert nodes_for(4, {"name": "local", "max_parallel": 1}) == 1
    cells = plan_cells(compose_cells(["launcher=slurm", "launcher.gpus_per_node=1", "shards=2"], multirun=False))
    assert cells[0].nodes == 2


@pytest.fixture()
def fake_policy(monkeypatch):
    """A policy module that allows only caps of 150-250 W on partition "gpu"."""
    seen = []

    class Policy:
        def check(self, *, gpu_name, partition, power_cap_w, user, account):
            seen.append(dict(gpu_name=gpu_name, partition=partition, power_cap_w=power_cap_w, user=user, account=account))
            if power_cap_w is not None and not 150 <= power_cap_w <= 250:
                return f"{power_cap_w:g} W is not allowed (150-250 W)"
            return None

    module = types.ModuleType("workers.gpu.policy")
    module.load_policy = lambda path: Policy()
    monkeypatch.setitem(sys.modules, "workers.gpu.policy", module)
    return seen


def test_policy_breach_is_a_plan_error(in_tmp, fake_policy):
    (in_tmp / "policy.yaml").write_text("rules: []\n")
    sweep = compose_cells(["power_cap_w=175,120", "gpu.policy=policy.yaml", "launcher=slurm",
                           "launcher.partition=gpu", "launcher.account=lab"], multirun=True)
    with pytest.raises(PolicyError, match="120 W is not allowed"):
        plan_cells(sweep)
    assert fake_policy[0]["partition"] == "gpu" and fake_policy[0]["account"] == "lab"
    assert "V100" in fake_policy[0]["gpu_name"]


def test_policy_allows(in_tmp, fake_policy):
    sweep = compose_cells(["power_cap_w=175,null", "gpu.policy=policy.yaml"], multirun=True)
    assert all(c.feasible for c in plan_cells(sweep))
    assert len(fake_policy) == 2


def test_cli_policy_breach_submits_nothing(in_tmp, fake_policy, capsys):
    from orchestrator.cli import main

    assert main(["sweep", "sweep_dir=out", "power_cap_w=120", "gpu.policy=p.yaml"]) == 2
    assert "breaks the site policy" in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


def test_fp8_kv_cache_is_its_own_cell_and_needs_an_fp8_card(in_tmp):
    base = one(["model=llama-7b", "batch_size=64", "gpu.profile=h100"])
    fp8 = one(["model=llama-7b", "batch_size=64", "gpu.profile=h100", "kv_cache_dtype=float8_e4m3fn"])
    assert base.kv_cache_dtype == "auto" and fp8.kv_cache_dtype == "float8_e4m3fn"
    assert fp8.cell_id != base.cell_id
    assert infeasible_reason(fp8, GPU_PROFILES["h100"]) is None
    # half the cache bytes: the difference in memory is half the bf16 cache (plus the overhead)
    from orchestrator.plan.feasibility import kv_cache_bytes

    assert kv_cache_bytes(fp8) * 2 == kv_cache_bytes(base)
    assert memory_needed_bytes(fp8) < memory_needed_bytes(base)
    reason = infeasible_reason(replace(fp8, gpu_kind="v100"), GPU_PROFILES["v100"])
    assert reason.startswith("kv_cache_dtype=float8_e4m3fn needs 8-bit float support")
    assert "use kv_cache_dtype=auto, or gpu.profile one of h100, h200" in reason


def test_cells_planned_before_kv_cache_dtype_keep_their_ids(in_tmp):
    """The id of an "auto" cell is the hash of the parameters without the key, so cells
    planned before the key existed (params.json without it) keep their ids and load."""
    import hashlib

    from orchestrator.contracts import CellParams, canonical_json

    params = one(["model=llama-7b"])
    old = {k: v for k, v in params.to_dict().items() if k != "kv_cache_dtype"}
    assert params.cell_id == hashlib.sha256(canonical_json(old).encode()).hexdigest()[:12]
    assert CellParams.from_dict(old) == params
    with pytest.raises(ValueError, match="missing"):
        CellParams.from_dict({k: v for k, v in old.items() if k != "seed"})


@pytest.mark.parametrize("overrides,profile,fewest", [
    # 135 GiB on 32 GiB cards: 5 would hold it, but 64 heads split only in powers of two
    (["model=llama-65b", "shards=1", "batch_size=1"], "v100", 8),
    # 8 KV heads as well as 64 heads; two 80 GiB cards hold it
    (["model=llama2-70b", "shards=1", "batch_size=1", "gpu.profile=h100"], "h100", 2),
    # 52 heads (LLaMA 33B): 1, 2, 4 only
    (["model=llama-33b", "shards=1", "batch_size=1"], "v100", 4),
])
def test_memory_hint_names_a_shard_count_that_splits_the_heads_and_fits(in_tmp, overrides, profile, fewest):
    from orchestrator.plan.feasibility import fewest_shards_that_fit

    params = one(overrides)
    reason = infeasible_reason(params, GPU_PROFILES[profile])
    assert f"use more shards (shards={fewest}: the fewest that split the heads and fit)" in reason
    assert fewest_shards_that_fit(params, GPU_PROFILES[profile]) == fewest
    assert infeasible_reason(replace(params, shards=fewest), GPU_PROFILES[profile]) is None


def test_memory_hint_when_no_shard_count_fits(in_tmp):
    params = one(["model=llama-33b", "shards=1", "batch_size=512", "max_prompt_tokens=1024", "max_new_tokens=1024"])
    reason = infeasible_reason(params, GPU_PROFILES["v100"])
    assert "even shards=4 (the most that split llama-33b's heads) is too little; use a smaller batch" in reason


def test_dry_run_of_only_infeasible_cells_exits_2_like_the_real_run(in_tmp, capsys):
    from orchestrator.cli import main

    assert main(["sweep", "--dry-run", "-m", "model=llama-65b", "shards=1", "sweep_dir=out"]) == 2
    captured = capsys.readouterr()
    assert "use more shards (shards=8" in captured.out
    assert "every cell is infeasible (reasons above); nothing was launched" in captured.err
    assert not (in_tmp / "out").exists()


def test_a_real_run_of_only_infeasible_cells_leaves_no_folder(in_tmp, capsys):
    from orchestrator.cli import main

    assert main(["sweep", "-m", "model=llama-65b", "shards=1", "sweep_dir=out"]) == 2
    captured = capsys.readouterr()
    assert "infeasible: needs" in captured.out
    assert "every cell is infeasible (reasons above); nothing was launched" in captured.err
    assert not (in_tmp / "out").exists()  # no plan.jsonl, sweep.yaml or lock of a sweep that never was


def test_dry_run_with_a_feasible_cell_still_exits_0(in_tmp, capsys, monkeypatch):
    from orchestrator.cli import main
    from orchestrator.submit import local

    monkeypatch.setattr(local, "cpu_memory_bytes", lambda: None)  # a machine with a GPU: 65B is for its cards
    assert main(["sweep", "--dry-run", "-m", "model=llama-65b", "shards=1,8", "sweep_dir=out"]) == 0
    assert not (in_tmp / "out").exists()


def test_local_cells_on_a_machine_without_a_gpu_must_fit_its_memory(in_tmp):
    """With no NVIDIA GPU here the local launcher runs the model on the CPU: a cell whose
    weights and KV cache exceed the host's available memory is infeasible, and says why and
    what to do; a Slurm cell of the same model is not the login node's business."""
    sweep = compose_cells(["model=llama-7b,llama-tiny", "shards=1,2"], multirun=True)
    seven_b = memory_needed_bytes(sweep.cells[0].params)
    cells = plan_cells(sweep, cpu_memory_bytes=seven_b - 1)
    reasons = {(c.params.model, c.params.shards): c.reason for c in cells}
    for shards in (1, 2):  # shards split the model over processes of the same machine: no help
        assert reasons[("llama-7b", shards)] == (
            f"runs on this machine's CPU (no NVIDIA GPU here; telemetry simulated) and needs "
            f"{seven_b / 2**30:.1f} GiB (weights + KV cache + 10%), but {(seven_b - 1) / 2**30:.1f} GiB of "
            f"memory is available; use model=llama-tiny here, or launcher=slurm to run on GPU nodes")
        assert reasons[("llama-tiny", shards)] is None
    assert all(c.feasible for c in plan_cells(sweep, cpu_memory_bytes=seven_b))  # the limit is inclusive
    # cells that run at once share the memory
    two = plan_cells(compose_cells(["model=llama-7b", "launcher.max_parallel=2"], multirun=False),
                     cpu_memory_bytes=2 * seven_b - 2)[0]
    assert not two.feasible and "GiB for each of launcher.max_parallel=2 cells at once; use" in two.reason
    assert plan_cells(compose_cells(["model=llama-7b", "launcher.max_parallel=2"], multirun=False),
                      cpu_memory_bytes=2 * seven_b)[0].feasible
    assert all(c.feasible for c in plan_cells(sweep))  # a machine with a GPU: the cards' rules only
    slurm = compose_cells(["launcher=slurm", "model=llama-7b"], multirun=False)
    assert plan_cells(slurm, cpu_memory_bytes=1)[0].feasible


def test_sweep_command_checks_host_memory_only_without_a_gpu(in_tmp, capsys, monkeypatch):
    from orchestrator.cli import main
    from orchestrator.submit import local

    monkeypatch.setattr(local, "cpu_memory_bytes", lambda: 4 << 30)
    assert main(["sweep", "--dry-run", "model=llama-7b", "sweep_dir=out"]) == 2
    assert "but 4.0 GiB of memory is available; use model=llama-tiny here" in capsys.readouterr().out
    monkeypatch.setattr(local, "cpu_memory_bytes", lambda: None)
    assert main(["sweep", "--dry-run", "model=llama-7b", "sweep_dir=out"]) == 0


def test_cpu_memory_is_asked_only_where_no_gpu_is(monkeypatch):
    from orchestrator.submit import local

    monkeypatch.setattr(local, "_gpu_uuids", lambda: ["GPU-0"])
    assert local.cpu_memory_bytes() is None
    monkeypatch.setattr(local, "_gpu_uuids", lambda: [])
    have = local.cpu_memory_bytes()
    assert have is not None and 0 < have <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
