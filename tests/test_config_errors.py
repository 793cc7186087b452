"""Bad input: one line that names what is wrong and what is valid; nothing launched."""
from __future__ import annotations

import pytest

from orchestrator.cli import main
from orchestrator.config import ConfigError, compose_cells
from conftest import SHARED_DATA


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
    (["fail_on_purpose=bogus"], "fail_on_purpose=bogus: unknown; valid: raise, raise-rank-N, kill-rank-N, hang-rank-N (N a rank), or null"),
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


@pytest.mark.parametrize("overrides,keys", [
    (["fail_on_purpose=null,raise-rank-1", "shards=1,2"], "fail_on_purpose"),
    (["telemetry_hz=5,10"], "telemetry_hz"),
    (["energy_hz=1,2"], "energy_hz"),
    (["sleep_s=0,1"], "sleep_s"),
    (["cuda_graph=true,false"], "cuda_graph"),
    (["warmup_batches=0,1"], "warmup_batches"),
    (["gpu.backend=auto,simulated"], "gpu.backend"),
    (["gpu.observe=true,false"], "gpu.observe"),
    (["telemetry_hz=5,10", "gpu.state_dir=a,b"], "telemetry_hz, gpu.state_dir"),
])
def test_settings_not_in_the_cell_id_cannot_be_swept(in_tmp, overrides, keys):
    """`fail_on_purpose=null,raise-rank-1 shards=1,2` used to give 2 cells, not 4: the
    raise variant was dropped, silently; `telemetry_hz=5,10` gave one cell."""
    with pytest.raises(ConfigError) as info:
        compose_cells(overrides, multirun=True)
    message = str(info.value)
    assert f"{keys} cannot be swept" in message
    assert "not in the cell id, so the combinations would collapse into one cell id" in message
    assert "run them as separate sweeps" in message and "\n" not in message


def test_a_config_group_that_changes_only_how_cells_run_cannot_be_swept(in_tmp):
    # gpu=auto and gpu=simulated differ in the backend only: one id, two ways to run it
    with pytest.raises(ConfigError, match=r"gpu=auto and gpu=simulated give one cell id \(gpu says how a cell runs"):
        compose_cells(["gpu=auto,simulated"], multirun=True)


def test_a_preset_grid_may_not_sweep_a_run_setting(in_tmp):
    from orchestrator.config.compose import _grid_overrides

    with pytest.raises(ConfigError, match=r"telemetry_hz=5,10 \(in the grid of \+experiment=mine\): telemetry_hz cannot be swept"):
        _grid_overrides({"shards": [1, 2], "telemetry_hz": [5, 10]}, set(), "mine")


def test_sweeps_that_keep_one_cell_per_id_are_still_allowed(in_tmp):
    # the run settings set once, the measured ones swept; a duplicate value is one cell, as before
    sweep = compose_cells(["fail_on_purpose=raise-rank-1", "telemetry_hz=5", "shards=1,2", "power_cap_w=150,150.0"],
                          multirun=True)
    assert len({c.params.cell_id for c in sweep.cells}) == 2
    assert {c.options.fail_on_purpose for c in sweep.cells} == {"raise-rank-1"}


def test_run_only_keys_cover_every_setting_outside_the_cell_id():
    """Each schema key either changes what a cell measures (a CellParams field) or is
    listed as run-only; a key added later must be put on one side."""
    import dataclasses

    from orchestrator.config.schema import GpuConf, SweepConf
    from orchestrator.config.sweep_rules import is_run_only

    measured = {"model", "dataset", "shards", "batch_size", "power_cap_w", "max_new_tokens", "max_prompt_tokens",
                "n_prompts", "seed", "weights", "dtype", "kv_cache_dtype", "tokenizer", "sort_by_length",
                "gpu.profile",  # gpu_kind
                "data_root"}  # reaches the id through each dataset's path
    separate = {"sweep_dir", "grid", "gpu", "launcher"}  # refused on their own, or groups checked after composing
    keys = [f.name for f in dataclasses.fields(SweepConf)] + [f"gpu.{f.name}" for f in dataclasses.fields(GpuConf)]
    for key in keys:
        assert (key in measured) != is_run_only(key) or key in separate, key


# -- dataset files: one file per dataset kind, and the right format, checked at plan time

SHARED = str(SHARED_DATA)
ALPACA = f"{SHARED}/alpaca/alpaca_data_1k.json"
GSM8K = f"{SHARED}/gsm8k/train.jsonl"
SEED_TASKS = f"{SHARED}/alpaca/seed_tasks.jsonl"
needs_data = pytest.mark.skipif(not __import__("os").path.isfile(GSM8K), reason=f"real data not present at {SHARED}")


@needs_data
def test_one_dataset_path_for_two_dataset_kinds_is_refused(in_tmp):
    with pytest.raises(ConfigError) as info:
        compose_cells(["dataset=alpaca,gsm8k", f"dataset.path={ALPACA}"], multirun=True)
    message = str(info.value)
    assert message.startswith(f"dataset.path={ALPACA} would be read as both dataset=alpaca and dataset=gsm8k")
    assert "set data_root=FOLDER instead" in message and "\n" not in message


@needs_data
def test_one_dataset_path_for_one_kind_and_synthetic_is_fine(in_tmp):
    sweep = compose_cells(["dataset=alpaca,synthetic", f"dataset.path={ALPACA}"], multirun=True)
    assert [c.params.dataset_path for c in sweep.cells] == [ALPACA, None]


@needs_data
@pytest.mark.parametrize("dataset,path,expected", [
    ("gsm8k", ALPACA, "not gsm8k data (resolved to {path}): expected JSON Lines whose first line is an object with a "
                      "\"question\" string; its first line is not a JSON object: it begins with '[{\"instruction\""),
    ("alpaca", GSM8K, "not alpaca data (resolved to {path}): expected a JSON array whose first element is an object "
                      "with an \"instruction\" string; it begins with '{\"question\""),
    ("alpaca", SEED_TASKS, "not alpaca data (resolved to {path}): expected a JSON array"),
    ("gsm8k", SEED_TASKS, "its first line has no 'question' string (its keys: id, name, instruction"),
])
def test_a_real_file_of_the_wrong_format_is_refused_at_plan_time(in_tmp, dataset, path, expected):
    with pytest.raises(ConfigError) as info:
        compose_cells([f"dataset={dataset}", f"dataset.path={path}"], multirun=False)
    message = str(info.value)
    assert message.startswith(f"dataset.path={path}: ")
    assert expected.replace("{path}", path) in message and "\n" not in message


@needs_data
def test_the_wrong_file_names_the_kind_it_looks_like(in_tmp):
    with pytest.raises(ConfigError, match=r"it looks like alpaca data \(dataset=alpaca\)"):
        compose_cells(["dataset=gsm8k", f"dataset.path={ALPACA}"], multirun=False)


@needs_data
def test_the_real_files_pass_the_plan_time_check(in_tmp):
    sweep = compose_cells(["dataset=alpaca,gsm8k", f"data_root={SHARED}"], multirun=True)
    assert [c.params.dataset_path for c in sweep.cells] == [ALPACA, GSM8K]


FORMATS = [
    ("gsm8k", '{"answer": "2"}\n{"question": "1+1?"}\n', "its first line has no 'question' string (its keys: answer)"),
    ("gsm8k", '{"question": 7}\n', "its first line has no 'question' string"),
    ("gsm8k", '{"question": "a",\n', "its first line is not valid JSON"),
    ("gsm8k", '\n\n"just text"\n', "its first line is not a JSON object: it begins with '\"just text\"'"),
    ("alpaca", '[{"input": "x", "output": "y"}]', "its first element has no 'instruction' string (its keys: input, output)"),
    ("alpaca", '["a", "b"]', "its first element is not a JSON object"),
    ("alpaca", '[{"instruction": oops}]', "its first element is not valid JSON"),
    ("alpaca", '{"instruction": "x"}', "it begins with '{\"instruction\": \"x\"}', not a JSON array"),
    ("alpaca", '[{"instruction": "x"}', "it is not valid JSON"),  # a small file is checked whole
]


@pytest.mark.parametrize("dataset,content,expected", FORMATS)
def test_a_file_of_the_wrong_format_names_file_kind_and_expectation(in_tmp, dataset, content, expected):
    (in_tmp / "data.txt").write_text(content)
    with pytest.raises(ConfigError) as info:
        compose_cells([f"dataset={dataset}", "dataset.path=data.txt"], multirun=False)
    message = str(info.value)
    assert message.startswith(f"dataset.path=data.txt: not {dataset} data (resolved to {in_tmp / 'data.txt'}): expected ")
    assert expected in message and "\n" not in message


def test_the_format_check_reads_only_the_beginning(in_tmp):
    """Files can be large: the first record decides; the rest is the worker's to read."""
    from orchestrator.config.validate import HEAD_BYTES

    junk = "x" * (4 * HEAD_BYTES)
    (in_tmp / "big.jsonl").write_text('{"question": "1+1?"}\n' + junk)
    (in_tmp / "big.json").write_text('[{"instruction": "Say hi."}, ' + junk)
    # a first record longer than the part read is judged by how it begins only
    (in_tmp / "long.jsonl").write_text('{"question": "' + "y" * (2 * HEAD_BYTES) + '"}\n')
    for dataset, name in (("gsm8k", "big.jsonl"), ("alpaca", "big.json"), ("gsm8k", "long.jsonl")):
        cell = compose_cells([f"dataset={dataset}", f"dataset.path={name}"], multirun=False).cells[0]
        assert cell.params.dataset_path == name
    (in_tmp / "long.json").write_text('[["' + "y" * (2 * HEAD_BYTES) + '"]]')
    with pytest.raises(ConfigError, match="its first element is not a JSON object"):
        compose_cells(["dataset=alpaca", "dataset.path=long.json"], multirun=False)


def test_an_empty_data_root_is_refused(in_tmp):
    with pytest.raises(ConfigError, match="data_root=: must be a folder"):
        compose_cells(["data_root="], multirun=False)


def test_dataset_files_with_a_byte_order_mark_blank_lines_first_or_unreadable(tmp_path):
    from orchestrator.config.validate import _dataset_problem

    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "a"}\n')
    assert "byte-order mark" in _dataset_problem(str(bom), "gsm8k")
    blank_first = tmp_path / "blank.jsonl"
    blank_first.write_text("\n" * 9000 + '{"question": "q", "answer": "a"}\n')
    assert _dataset_problem(str(blank_first), "gsm8k") is None  # the worker skips blank lines too
    folder_like = tmp_path / "unreadable.jsonl"
    folder_like.write_text('{"question": "q"}\n')
    import builtins
    real_open = builtins.open

    def refuse(path, *a, **k):
        if str(path) == str(folder_like):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    builtins.open = refuse
    try:
        assert "cannot be read (Permission denied" in _dataset_problem(str(folder_like), "gsm8k")
    finally:
        builtins.open = real_open
