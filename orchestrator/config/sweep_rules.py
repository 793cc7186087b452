"""Rules about a sweep as a whole, not one cell: what may be swept, and which
file each dataset reads. Each fails with one line naming the key(s) and the fix.

A cell's id hashes only what changes a measurement (``CellParams``); cells of one
id collapse to one. A sweep whose combinations differ only in how a cell runs
would therefore drop all but one of them, silently: such sweeps are refused.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from hydra.core.override_parser.types import Override

from orchestrator.config.validate import ConfigError, resolve_path

# Keys that say how a cell runs, not what it measures (RunOptions, the launcher):
# not in the cell id. A key or a prefix of keys ("launcher" covers launcher.*).
RUN_ONLY_KEYS = (
    "launcher", "telemetry_hz", "energy_hz", "warmup_batches", "cuda_graph", "fail_on_purpose", "sleep_s",
    "gpu.backend", "gpu.fail", "gpu.observe", "gpu.cap_tolerance_w", "gpu.state_dir", "gpu.site_ledger",
    "gpu.policy", "description",
)


def _why(subject: str, plural: bool) -> str:
    return (f"{subject} {'say' if plural else 'says'} how a cell runs, not what it measures: not in the cell id, "
            f"so the combinations would collapse into one cell id")


def is_run_only(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in RUN_ONLY_KEYS)


def check_run_only_sweeps(parsed: Iterable[Override], where: str = "") -> None:
    """Refuse a sweep over keys that are not in the cell id (``where``: the preset, if from its grid)."""
    swept = [o for o in parsed if o.is_sweep_override() and is_run_only(o.key_or_group)]
    if not swept:
        return
    keys = list(dict.fromkeys(o.key_or_group for o in swept))
    launcher = [k for k in keys if k.split(".")[0] == "launcher"]
    if len(launcher) == len(keys):
        why, fix = _why("they", plural=True), "run one sweep per setting"
    else:
        why, fix = _why("it" if len(keys) == 1 else "they", plural=len(keys) > 1), "run them as separate sweeps, one per value"
    if launcher:
        fix += ", or change launcher settings later with `wattsweep resubmit SWEEP_DIR --launcher KEY=VALUE`"
    what = "launcher settings" if len(launcher) == len(keys) else ", ".join(keys)
    lines = " ".join(o.input_line for o in swept)
    raise ConfigError(f"{lines}{where}: {what} cannot be swept ({why}); {fix}")


def check_one_file_per_dataset(composed: Sequence[tuple[Sequence[str], Mapping[str, Any]]], cwd: Any) -> None:
    """One file holds one dataset kind. ``dataset.path=F`` applies to every cell,
    so with ``dataset=alpaca,gsm8k`` it would point the GSM8K cells at F too."""
    kinds: dict[str, dict[str, str]] = {}  # file -> {dataset: path as written}
    for _, cfg in composed:
        dataset = cfg.get("dataset") or {}
        name, path = dataset.get("name"), dataset.get("path")
        if name == "synthetic" or not isinstance(path, str) or not path:
            continue
        file = os.path.normpath(resolve_path(path, cwd))
        kinds.setdefault(file, {}).setdefault(str(name), path)
    for names in kinds.values():
        if len(names) > 1:
            a, b = sorted(names)[:2]
            raise ConfigError(
                f"dataset.path={names[a]} would be read as both dataset={a} and dataset={b} (one dataset.path "
                f"applies to every dataset of the sweep); set data_root=FOLDER instead, which gives each dataset "
                f"its own file under FOLDER, or run one sweep per dataset")


def check_no_collapsed_variants(cells: Sequence[Any]) -> None:
    """Backstop for what RUN_ONLY_KEYS cannot name (a config group such as
    ``gpu=auto,simulated``): two cells of one id that would run differently."""
    first: dict[str, Any] = {}
    for cell in cells:
        seen = first.setdefault(cell.params.cell_id, cell)
        if seen is cell or (seen.options, dict(seen.launcher)) == (cell.options, dict(cell.launcher)):
            continue
        keys = _differing_keys(seen.overrides, cell.overrides)
        both = " and ".join(_values(seen.overrides, cell.overrides, keys))
        why = _why(", ".join(keys), plural=len(keys) > 1)
        raise ConfigError(f"{both} give one cell id ({why}); run them as separate sweeps, one per value")


def _assignments(overrides: Sequence[str]) -> dict[str, str]:
    out = {}
    for line in overrides:
        key, _, value = line.partition("=")
        out[key.lstrip("+~")] = value
    return out


def _differing_keys(a: Sequence[str], b: Sequence[str]) -> list[str]:
    va, vb = _assignments(a), _assignments(b)
    return [k for k in dict.fromkeys([*va, *vb]) if va.get(k) != vb.get(k)]


def _values(a: Sequence[str], b: Sequence[str], keys: list[str]) -> list[str]:
    va, vb = _assignments(a), _assignments(b)
    return [" ".join(f"{k}={v.get(k, '(default)')}" for k in keys) for v in (va, vb)]
