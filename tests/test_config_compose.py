"""Composition of Hydra overrides into cells: grid expansion, presets, ids."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import ConfigError, compose_cells, group_choices
from orchestrator.contracts import CellParams
from conftest import SHARED_DATA


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """A work folder with small stand-in data files where the dataset configs
    look for them by default (../shared/data/...)."""
    work = tmp_path / "work"
    work.mkdir()
    data = tmp_path / "shared" / "data"
    (data / "alpaca").mkdir(parents=True)
    (data / "alpaca" / "alpaca_data_1k.json").write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    (data / "gsm8k").mkdir()
    (data / "gsm8k" / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    monkeypatch.chdir(work)
    return work


def ids(sweep):
    return [c.params.cell_id for c in sweep.cells]


def test_default_is_one_tiny_local_cell(in_tmp):
    sweep = compose_cells([], multirun=False)
    assert len(sweep.cells) == 1
    cell = sweep.cells[0]
    assert cell.params.model == "llama-tiny"
    assert cell.params.dataset == "synthetic" and cell.params.dataset_path is None
    assert cell.params.n_prompts == 4096 and cell.params.power_cap_w is None
    assert cell.options.gpu_backend == "auto" and cell.options.gpu_profile == "v100"
    assert sweep.launcher_name == "local" and cell.launcher["max_parallel"] == 1
    assert sweep.sweep_dir.is_absolute() and sweep.sweep_dir.parent == in_tmp / "sweeps"


def test_default_cell_id_is_a_fixed_string(in_tmp):
    # The id of the default cell must not change with the machine, the folder or
    # the Python run; a change here changes every id of every earlier sweep.
    assert ids(compose_cells([], multirun=False)) == ["f31551b26009"]


def test_ids_stable_when_grid_reordered(in_tmp):
    a = compose_cells(["shards=1,2", "batch_size=1,4", "power_cap_w=null,150"], multirun=True)
    b = compose_cells(["power_cap_w=150,null", "batch_size=4,1", "shards=2,1"], multirun=True)
    assert len(a.cells) == 8 and sorted(ids(a)) == sorted(ids(b))
    assert len(set(ids(a))) == 8


def test_whole_float_cap_hashes_like_int(in_tmp):
    a = compose_cells(["power_cap_w=150"], multirun=False)
    b = compose_cells(["power_cap_w=150.0"], multirun=False)
    assert ids(a) == ids(b) and a.cells[0].params.power_cap_w == 150.0


def test_range_and_list_expand(in_tmp):
    sweep = compose_cells(["shards=range(1,3)", "batch_size=choice(1,8,64)"], multirun=True)
    got = sorted((c.params.shards, c.params.batch_size) for c in sweep.cells)
    assert got == [(1, 1), (1, 8), (1, 64), (2, 1), (2, 8), (2, 64)]


def test_sweep_without_multirun_is_an_error(in_tmp):
    with pytest.raises(ConfigError, match="add -m"):
        compose_cells(["shards=1,2"], multirun=False)


def test_model_group_choice_sets_shape(in_tmp):
    cell = compose_cells(["model=llama2-70b"], multirun=False).cells[0]
    assert cell.params.model_args["n_kv_heads"] == 8 and cell.params.model_args["dim"] == 8192
    assert cell.params.model_args["ffn_dim_multiplier"] == 1.3


def test_all_models_listed():
    assert set(group_choices("model")) >= {
        "llama-tiny", "llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama2-7b", "llama2-13b", "llama2-70b"}


@pytest.mark.parametrize("preset,expected", [("paper_throughput", 40), ("paper_energy", 80), ("paper_powercap", 18), ("smoke", 4)])
def test_presets_expand(in_tmp, preset, expected):
    sweep = compose_cells([f"+experiment={preset}"], multirun=True)
    assert len(sweep.cells) == expected
    assert len(set(ids(sweep))) == expected


def test_powercap_preset_has_paper_caps(in_tmp):
    sweep = compose_cells(["+experiment=paper_powercap"], multirun=True)
    assert {c.params.power_cap_w for c in sweep.cells} == {250.0, 175.0, 150.0}
    assert {c.params.shards for c in sweep.cells} == {8, 16, 32}
    assert {c.params.dataset for c in sweep.cells} == {"alpaca", "gsm8k"}
    assert {c.params.n_prompts for c in sweep.cells} == {4096}
    assert {c.params.max_new_tokens for c in sweep.cells} == {256}


def test_command_line_wins_over_preset_grid(in_tmp):
    sweep = compose_cells(["+experiment=smoke", "shards=1", "n_prompts=8"], multirun=True)
    assert {c.params.shards for c in sweep.cells} == {1}
    assert {c.params.batch_size for c in sweep.cells} == {1, 4}
    assert {c.params.n_prompts for c in sweep.cells} == {8}


def test_preset_without_multirun_is_an_error(in_tmp):
    with pytest.raises(ConfigError, match="add -m"):
        compose_cells(["+experiment=smoke"], multirun=False)


def test_relative_dataset_path_keeps_id_across_folders(tmp_path, monkeypatch):
    # Two checkouts in different places with the data next to them: same cell ids.
    got = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        (root / "data" / "train.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
        (root / "work").mkdir()
        monkeypatch.chdir(root / "work")
        sweep = compose_cells(["dataset=gsm8k", "dataset.path=../data/train.jsonl"], multirun=False)
        cell = sweep.cells[0]
        assert cell.options.extra["dataset_path_resolved"] == str((root / "data" / "train.jsonl").resolve())
        got.append(cell.params.cell_id)
    assert got[0] == got[1]


def test_default_dataset_paths_find_the_shared_data(monkeypatch):
    import orchestrator

    repo = Path(orchestrator.__file__).parent.parent
    if not (repo.parent / "shared" / "data" / "alpaca").is_dir():
        pytest.skip(f"real data not present at {repo.parent / 'shared' / 'data'}")
    monkeypatch.chdir(repo)
    sweep = compose_cells(["dataset=alpaca,gsm8k"], multirun=True)
    assert [c.params.dataset_path for c in sweep.cells] == [
        "../shared/data/alpaca/alpaca_data_1k.json", "../shared/data/gsm8k/train.jsonl"]


def test_launcher_slurm_fields(in_tmp):
    cell = compose_cells(["launcher=slurm", "launcher.gpus_per_node=1", "launcher.partition=debug"], multirun=False).cells[0]
    assert cell.launcher["name"] == "slurm" and cell.launcher["gpus_per_node"] == 1
    assert cell.launcher["partition"] == "debug" and cell.launcher["sbatch_extra"] == []


def test_cell_params_round_trip(in_tmp):
    cell = compose_cells(["model=llama-7b", "power_cap_w=175"], multirun=False).cells[0]
    assert CellParams.from_dict(cell.params.to_dict()) == cell.params


# -- data_root: where every dataset's default file lies

SHARED = SHARED_DATA  # the real files, read in place
needs_data = pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").is_file(), reason=f"real data not present at {SHARED}")


@needs_data
@pytest.mark.parametrize("preset,expected", [("paper_powercap", 18), ("paper_throughput", 40), ("paper_energy", 80)])
def test_data_root_fixes_every_dataset_of_a_preset_from_any_folder(tmp_path, monkeypatch, preset, expected):
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    with pytest.raises(ConfigError, match=r"no such file .*; set data_root=FOLDER to the folder that holds "
                                          r"alpaca/alpaca_data_1k.json and gsm8k/train.jsonl \(now data_root=../shared/data\)"):
        compose_cells([f"+experiment={preset}"], multirun=True)
    sweep = compose_cells([f"+experiment={preset}", f"data_root={SHARED}"], multirun=True)
    assert len(sweep.cells) == expected
    assert {(c.params.dataset, c.params.dataset_path) for c in sweep.cells} == {
        ("alpaca", f"{SHARED}/alpaca/alpaca_data_1k.json"), ("gsm8k", f"{SHARED}/gsm8k/train.jsonl")}
    assert {c.options.extra["dataset_path_resolved"] for c in sweep.cells} == {
        f"{SHARED}/alpaca/alpaca_data_1k.json", f"{SHARED}/gsm8k/train.jsonl"}


def test_the_default_data_root_keeps_the_ids_of_existing_configs(in_tmp):
    # Ids of these cells as planned before data_root existed: a change here orphans earlier sweeps.
    sweep = compose_cells(["dataset=alpaca,gsm8k"], multirun=True)
    assert [c.params.dataset_path for c in sweep.cells] == [
        "../shared/data/alpaca/alpaca_data_1k.json", "../shared/data/gsm8k/train.jsonl"]
    assert ids(sweep) == ["62749c400d36", "b806d28e96d0"]
    assert ids(compose_cells(["+experiment=paper_powercap"], multirun=True))[:2] == ["f4c9fc8fd66b", "5fba5d74cfbd"]
    assert ids(compose_cells(["dataset=alpaca,gsm8k", "data_root=../shared/data/"], multirun=True)) == ids(sweep)


def test_data_root_is_like_writing_the_path_out(in_tmp):
    root = (in_tmp.parent / "shared" / "data").resolve()
    by_root = compose_cells(["dataset=gsm8k", f"data_root={root}"], multirun=False).cells[0]
    by_path = compose_cells(["dataset=gsm8k", f"dataset.path={root}/gsm8k/train.jsonl"], multirun=False).cells[0]
    slash = compose_cells(["dataset=gsm8k", f"data_root={root}/"], multirun=False).cells[0]
    assert by_root.params == by_path.params == slash.params
    assert by_root.params.dataset_path == f"{root}/gsm8k/train.jsonl"


def test_a_tokenizer_may_live_under_data_root(in_tmp):
    root = in_tmp.parent / "shared" / "data"
    (root / "tokenizer.model").write_bytes(b"\0")
    cell = compose_cells(["tokenizer=${data_root}/tokenizer.model", f"data_root={root}/"], multirun=False).cells[0]
    assert cell.params.tokenizer_path == f"{root}/tokenizer.model"


def test_a_synthetic_sweep_needs_no_data_root(in_tmp):
    assert compose_cells(["data_root=/nowhere"], multirun=False).cells[0].params.dataset_path is None
