"""Bad input: one line that names what is wrong and what is valid; nothing launched."""
from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, compose_cells


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "none.json").write_text("[]")
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9"}]')
    return tmp_path


BAD = [
    (["model=llama-99"], "valid: llama-13b, llama-33b, llama-65b, llama-7b, llama-tiny"),
    (["shards=0"], "shards=0: must be a whole number >= 1"),
    (["batch_size=-1"], "batch_size=-1: must be a whole number >= 1"),
    (["power_cap_w=abc"], "valid: a number of watts, or null"),
    (["power_cap_w=-5"], "power_cap_w=-5"),
    (["dataset=alpaca", "dataset.path=missing.json"], "no such file"),
    (["dataset=alpaca", "dataset.path=empty.json"], "empty file"),
    (["dataset=alpaca", "dataset.path=none.json"], "holds no records"),
    (["dataset=alpaca", "dataset.path=latin1.json"], "not UTF-8 text (byte 0xe9); convert it"),
    (["dataset=mnist"], "valid: alpaca, gsm8k, synthetic"),
    (["kv_cache_dtype=int8"], "valid: auto, float8_e4m3fn"),
    (["foo=1"], "unknown key 'foo'; valid top-level keys: model, dataset"),
    (["+foo=1"], "unknown key 'foo'"),
    (["model.depth=3"], "valid keys of model: name, dim"),
    (["gpu.profile=x100"], "valid: a100, h100, h200, v100"),
    (["gpu.backend=amd"], "valid: auto, nvml"),
    (["dtype=int8"], "valid: bfloat16, float16, float32"),
    (["+experiment=nope"], "valid: paper_energy, paper_powercap, paper_throughput"),
    (["shards=[1"], "cannot parse override"),
    (["launcher=pbs"], "valid: local, slurm"),
    (["weights=/no/such/ckpt"], "valid: random, or a Meta checkpoint folder"),
    (["launcher.timeout_min=-3"], "launcher.timeout_min=-3.0: must be > 0 minutes"),
    (["launcher=slurm", "launcher.time_min=0"], "launcher.time_min=0: must be a whole number >= 1"),
    (["launcher=slurm", "launcher.array_parallelism=0"], "launcher.array_parallelism=0: must be a whole number >= 1"),
    (["fail_on_purpose=bogus"], "fail_on_purpose=bogus: unknown; valid: raise, raise-rank-N (N a rank), or null"),
]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_bad_input_is_one_line(in_tmp, overrides, expected):
    with pytest.raises(ConfigError) as info:
        compose_cells(overrides, multirun=False)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides", [o for o, _ in BAD[:8]])
def test_cli_bad_input_exits_nonzero_and_launches_nothing(in_tmp, capsys, overrides):
    code = main(["sweep", "sweep_dir=out", *overrides])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("wattsweep sweep: ") and len(err.splitlines()) == 1
    assert not (in_tmp / "out").exists()


def test_cli_sweep_without_m_names_the_fix(in_tmp, capsys):
    assert main(["sweep", "sweep_dir=out", "shards=1,2"]) == 2
    assert "add -m" in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


@pytest.mark.parametrize("overrides", [["launcher=slurm", "launcher.partition=dev,long"], ["launcher.max_parallel=1,2"]])
def test_launcher_settings_cannot_be_swept(in_tmp, overrides):
    """They are not in the cell id: such a grid used to collapse to one cell, silently."""
    with pytest.raises(ConfigError, match="launcher settings cannot be swept"):
        compose_cells(overrides, multirun=True)
