"""From Hydra overrides to resolved cells.

Hydra's override grammar does the parsing (lists ``a=1,2``, ``range(1,5)``,
``choice()``, ``+experiment=...``); its compose API does the composition, one
call per cell, so every cell is exactly what Hydra would give for its overrides.
A preset's ``grid`` (a list of sub-grids) is expanded after the command line:
keys given on the command line win over the preset's.
"""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hydra import compose, initialize_config_module
from hydra._internal.config_loader_impl import ConfigLoaderImpl  # Hydra's own override semantics
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.schema import (
    CONFIG_GROUPS,
    DatasetConf,
    GpuConf,
    LocalLauncherConf,
    ModelConf,
    SlurmLauncherConf,
    SweepConf,
    register_configs,
)
from orchestrator.config.sweep_rules import check_no_collapsed_variants, check_one_file_per_dataset, check_run_only_sweeps
from orchestrator.config.validate import ConfigError, resolve_path, validate_cell_config
from orchestrator.contracts import CellParams, RunOptions

CONFIG_MODULE = "hydra_conf"
MODEL_ARG_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                  "ffn_dim_multiplier", "norm_eps", "max_seq_len")
# What a value of the wrong type should have been, for error messages.
TYPE_HINTS = {
    "power_cap_w": "a number of watts, or null to leave the card as it is",
    "shards": "a whole number >= 1", "batch_size": "a whole number >= 1",
    "n_prompts": "a whole number >= 1", "max_new_tokens": "a whole number >= 1",
    "max_prompt_tokens": "a whole number >= 1", "seed": "a whole number",
    "data_root": "a folder holding alpaca/ and gsm8k/ (relative: against the current folder)",
}


@dataclass(frozen=True)
class ComposedCell:
    params: CellParams
    options: RunOptions
    launcher: Mapping[str, Any]  # resolved launcher config, "name" included
    overrides: tuple[str, ...]  # the overrides that produced this cell


@dataclass(frozen=True)
class ComposedSweep:
    cells: tuple[ComposedCell, ...]
    sweep_dir: Path  # absolute
    overrides: tuple[str, ...]  # as given on the command line
    multirun: bool
    launcher_name: str
    config: Mapping[str, Any] = field(default_factory=dict)  # first cell's resolved config (for sweep.yaml)
    cwd: str = ""
    sweep_dir_given: bool = True  # False: the default folder, named by the second it was composed


def config_dir() -> Path:
    import hydra_conf

    return Path(hydra_conf.__file__).parent


def group_choices(group: str) -> list[str]:
    """The YAML options of a config group, e.g. model -> [llama-13b, ...]."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


# ---------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------


def parse_overrides(overrides: Sequence[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed.extend(parser.parse_overrides([line]))
        except HydraException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot parse override {line!r}: {first}; form: key=value, key=a,b, key=range(1,5), +experiment=NAME") from None
    for o in parsed:
        if o.is_hydra_override():
            raise ConfigError(f"{o.input_line}: hydra.* settings are not used by wattsweep; set sweep_dir=... for the output folder")
        if o.key_or_group == "sweep_dir" and o.is_sweep_override():
            raise ConfigError(f"{o.input_line}: sweep_dir cannot be swept; a sweep has one folder")
        if o.is_sweep_override() and not o.is_discrete_sweep():
            raise ConfigError(f"{o.input_line}: interval sweeps cannot be listed; use a list a,b,c or range(start,stop,step)")
    _check_group_choices(parsed)
    return parsed


def _check_group_choices(parsed: list[Override]) -> None:
    for o in parsed:
        group = o.key_or_group
        if group not in CONFIG_GROUPS or o.is_delete():
            continue
        valid = group_choices(group)
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        for v in values:
            if v not in valid:
                raise ConfigError(f"unknown {group} {v!r}; valid: {', '.join(valid)}")
        if group == "experiment" and not o.is_add():
            raise ConfigError(f"{o.input_line}: presets are added with a plus sign: +experiment={values[0]}")


def _alternatives(o: Override) -> list[str]:
    key = o.get_key_element()
    if o.is_sweep_override():
        return [f"{key}={v}" for v in o.sweep_string_iterator()]
    return [f"{key}={o.get_value_element_as_str()}"]


def expand(parsed: list[Override]) -> list[list[str]]:
    """Cross product of the overrides' values, in command-line order."""
    return [list(combo) for combo in itertools.product(*(_alternatives(o) for o in parsed))]


def _grid_overrides(sub: Mapping[str, Any], given_keys: set[str], preset: str = "") -> list[list[str]]:
    lines = []
    for key, value in sub.items():
        if key in given_keys:
            continue  # the command line wins over the preset
        if isinstance(value, (list, tuple)):
            value = ",".join("null" if v is None else str(v) for v in value)
        lines.append(f"{key}={'null' if value is None else value}")
    parsed = parse_overrides(lines)
    check_run_only_sweeps(parsed, f" (in the grid of +experiment={preset})" if preset else " (in a preset's grid)")
    return expand(parsed)


# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------


class _Composer:
    """Composes cells fast: Hydra's compose runs once per choice of config
    groups (about 150 ms each); the value overrides of each cell are then applied
    to a copy with Hydra's own override semantics (``key=``, ``+key=``, ``++key=``,
    ``~key``) and type checks (a few ms)."""

    def __init__(self) -> None:
        self._bases: dict[tuple[str, ...], DictConfig] = {}
        self._parsed: dict[str, Override] = {}
        self._parser = OverridesParser.create()

    def _parse(self, line: str) -> Override:
        if line not in self._parsed:
            self._parsed[line] = self._parser.parse_overrides([line])[0]
        return self._parsed[line]

    def compose(self, overrides: list[str]) -> DictConfig:
        parsed = [self._parse(line) for line in overrides]
        groups = tuple(o.input_line for o in parsed if o.key_or_group in CONFIG_GROUPS)
        values = [o for o in parsed if o.key_or_group not in CONFIG_GROUPS]
        try:
            if groups not in self._bases:
                self._bases[groups] = compose(config_name="config", overrides=list(groups))
            cfg = copy.deepcopy(self._bases[groups])
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
            return cfg
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_one_line(e, overrides)) from None


def _one_line(e: BaseException, overrides: list[str]) -> str:
    """Hydra's composition errors span lines and chain causes; make one line."""
    cause = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("Could not override '"):
        return unknown_key_message(text.split("'")[1], overrides)
    if text.startswith("Error merging override") and cause is not None:
        line = text[len("Error merging override "):]
        key = line.split("=", 1)[0].lstrip("+~")
        reason = str(cause).strip().splitlines()[0]
        if "not in struct" in reason or "Key '" in reason and "not in" in reason:
            return unknown_key_message(key, overrides)
        hint = TYPE_HINTS.get(key)
        return f"{line}: {reason}" + (f"; valid: {hint}" if hint else "")
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return f"bad config {' '.join(overrides)}: {text}"


def _schema_keys(node: str, overrides: Sequence[str] = ()) -> list[str]:
    """Valid keys at the top level ("") or of a node (model, dataset, gpu, launcher)."""
    if node == "":
        return [f for f in SweepConf.__dataclass_fields__ if f not in ("grid", "description")]
    if node == "launcher":
        slurm = any(o.replace(" ", "").startswith("launcher=slurm") for o in overrides)
        return list((SlurmLauncherConf if slurm else LocalLauncherConf).__dataclass_fields__)
    schema = {"model": ModelConf, "dataset": DatasetConf, "gpu": GpuConf}.get(node)
    return list(schema.__dataclass_fields__) if schema else []


def unknown_key_message(key: str, overrides: Sequence[str] = ()) -> str:
    node, _, _ = key.rpartition(".")
    valid = _schema_keys(node, overrides)
    where = f"keys of {node}" if node else "top-level keys"
    return f"unknown key {key!r}; valid {where}: {', '.join(valid)}"


def check_known_keys(cfg: Mapping[str, Any], overrides: Sequence[str]) -> None:
    """``+key=value`` adds keys Hydra does not know; a typo there must fail too."""
    for node in ("", "model", "dataset", "gpu", "launcher"):
        values = cfg if node == "" else cfg[node]
        valid = set(_schema_keys(node, overrides)) | ({"grid", "description"} if node == "" else set())
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ConfigError(unknown_key_message(f"{node}.{unknown[0]}" if node else unknown[0], overrides))
        missing = [k for k in _schema_keys(node, overrides) if k not in values]
        if missing:
            key = f"{node}.{missing[0]}" if node else missing[0]
            raise ConfigError(f"{key} was removed; it is required (set it to a value, or null where allowed)")


def _compose_all(parsed: list[Override], multirun: bool) -> list[tuple[list[str], dict[str, Any]]]:
    given = {o.key_or_group for o in parsed}
    composer = _Composer()
    out: list[tuple[list[str], dict[str, Any]]] = []
    for combo in expand(parsed):
        cfg = composer.compose(combo)
        grid = list(cfg.get("grid") or [])
        if not grid:
            out.append((combo, _resolve(cfg, combo)))
            continue
        if not multirun:
            raise ConfigError(f"{' '.join(combo)}: this preset is a grid of sweeps; add -m to run it")
        preset = next((o.split("=", 1)[1] for o in combo if o.lstrip("+").startswith("experiment=")), "")
        for sub in grid:
            for extra in _grid_overrides(OmegaConf.to_container(sub, resolve=True), given, preset):
                full = combo + extra
                out.append((full, _resolve(composer.compose(full), full)))
    return out


def _resolve(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e, overrides)) from None


def compose_cells(overrides: list[str], multirun: bool, *, cwd: str | os.PathLike[str] | None = None) -> ComposedSweep:
    """Expand the overrides into resolved, validated cells (ConfigError on bad input)."""
    cwd_path = Path(cwd or os.getcwd()).resolve()
    parsed = parse_overrides(overrides)
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise ConfigError(f"{sweeps[0]} is a sweep; add -m to run a grid (without -m the command runs one cell)")
    # Launcher settings, telemetry rates, test switches say how a cell runs, not what
    # it measures: they are not in the cell id, so a sweep over them would collapse to one cell.
    check_run_only_sweeps(parsed)
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        composed = _compose_all(parsed, multirun)
    check_one_file_per_dataset(composed, cwd_path)  # before each cell's file check: the cause, not a symptom
    cells = tuple(_to_cell(cfg, tuple(ov), cwd_path) for ov, cfg in composed)
    check_no_collapsed_variants(cells)
    names = sorted({c.launcher["name"] for c in cells})
    if len(names) > 1:
        raise ConfigError(f"one sweep uses one launcher; got {', '.join(names)}")
    first = composed[0][1]
    return ComposedSweep(
        cells=cells,
        sweep_dir=resolve_path(str(first["sweep_dir"]), cwd_path).resolve(),
        overrides=tuple(overrides),
        multirun=multirun,
        launcher_name=names[0],
        config={k: v for k, v in first.items() if k != "grid"},
        cwd=str(cwd_path),
        sweep_dir_given=any(o.key_or_group == "sweep_dir" for o in parsed),
    )


def _abs(path: str | None, cwd: Path) -> str | None:
    return None if path is None else str(resolve_path(path, cwd).resolve())


def _tidy_root_joins(cfg: dict[str, Any]) -> dict[str, Any]:
    """``data_root=/data/`` makes ``${data_root}/gsm8k/...`` read ``/data//gsm8k/...``:
    the same file as with ``data_root=/data``, and it must get the same cell id."""
    root = str(cfg.get("data_root") or "")
    if not root.endswith("/"):
        return cfg

    def tidy(path: Any) -> Any:
        return root + path[len(root) + 1:] if isinstance(path, str) and path.startswith(root + "/") else path

    out = {**cfg, "dataset": {**cfg["dataset"]}}
    for node, key in ((out, "tokenizer"), (out["dataset"], "path")):
        if key in node:
            node[key] = tidy(node[key])
    return out


def _to_cell(cfg: dict[str, Any], overrides: tuple[str, ...], cwd: Path) -> ComposedCell:
    check_known_keys(cfg, overrides)
    cfg = _tidy_root_joins(cfg)
    validate_cell_config(cfg, cwd)
    model, dataset, gpu = cfg["model"], cfg["dataset"], cfg["gpu"]
    synthetic = dataset["name"] == "synthetic"
    params = CellParams(
        model=model["name"],
        model_args={k: model[k] for k in MODEL_ARG_KEYS},
        weights=cfg["weights"],
        dtype=cfg["dtype"],
        kv_cache_dtype=cfg["kv_cache_dtype"],
        shards=cfg["shards"],
        batch_size=cfg["batch_size"],
        power_cap_w=None if cfg["power_cap_w"] is None else float(cfg["power_cap_w"]),
        dataset=dataset["name"],
        # As written (the default: ${data_root}/..., so ../shared/data/... as before),
        # so that ids do not depend on the folder a sweep runs in; the absolute
        # path is in options.extra. Another data_root is another path: another id.
        dataset_path=None if synthetic else dataset["path"],
        n_prompts=cfg["n_prompts"],
        max_prompt_tokens=cfg["max_prompt_tokens"],
        max_new_tokens=cfg["max_new_tokens"],
        sort_by_length=bool(cfg["sort_by_length"]),
        tokenizer_path=cfg["tokenizer"],
        gpu_kind=gpu["profile"],
        seed=cfg["seed"],
    )
    options = RunOptions(
        gpu_backend=gpu["backend"],
        gpu_profile=gpu["profile"],
        gpu_fail=gpu["fail"],
        gpu_observe=bool(gpu["observe"]),
        cap_tolerance_w=float(gpu["cap_tolerance_w"]),
        state_dir=_abs(gpu["state_dir"], cwd),
        site_ledger=_abs(gpu["site_ledger"], cwd),
        policy_path=_abs(gpu["policy"], cwd),
        telemetry_hz=float(cfg["telemetry_hz"]),
        energy_hz=float(cfg["energy_hz"]),
        warmup_batches=int(cfg["warmup_batches"]),
        cuda_graph=bool(cfg["cuda_graph"]),
        fail_on_purpose=cfg["fail_on_purpose"],
        sleep_s=float(cfg["sleep_s"]),
        extra={
            "dataset_path_resolved": None if synthetic else _abs(dataset["path"], cwd),
            "weights_resolved": "random" if cfg["weights"] == "random" else _abs(cfg["weights"], cwd),
            "tokenizer_path_resolved": _abs(cfg["tokenizer"], cwd),
            "cwd": str(cwd),
        },
    )
    return ComposedCell(params=params, options=options, launcher=dict(cfg["launcher"]), overrides=overrides)
