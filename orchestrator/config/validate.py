"""Checks of a resolved cell config, each failing with one line that says what
is wrong and what is valid. Hydra's own type checks come first (compose.py);
these are the rules a type cannot express."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from orchestrator.contracts import GPU_PROFILES, KV_CACHE_DTYPES

DTYPES = ("bfloat16", "float16", "float32")
DATASETS = ("synthetic", "alpaca", "gsm8k")
GPU_BACKENDS = ("auto", "nvml", "nvidia-smi", "capctl", "simulated")
GPU_FAILS = ("permission", "range", "mismatch", "lost")
POSITIVE_INTS = ("shards", "batch_size", "n_prompts", "max_new_tokens", "max_prompt_tokens")
MODEL_POSITIVE_INTS = ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")


class ConfigError(ValueError):
    """A bad sweep config; the message is one line naming the valid choices."""


def _one_of(key: str, value: Any, valid: tuple[str, ...] | list[str]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value}: unknown; valid: {', '.join(valid)}")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value}: must be a whole number >= 1")


def validate_cell_config(cfg: Mapping[str, Any], cwd: Path) -> None:
    """Raise ConfigError for the first rule the resolved config breaks."""
    for key in POSITIVE_INTS:
        _positive_int(key, cfg[key])
    cap = cfg["power_cap_w"]
    if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
        raise ConfigError(f"power_cap_w={cap}: must be a number of watts > 0, or null to leave the card as it is")
    _one_of("dtype", cfg["dtype"], DTYPES)
    _one_of("kv_cache_dtype", cfg["kv_cache_dtype"], KV_CACHE_DTYPES)
    if cfg["warmup_batches"] < 0:
        raise ConfigError(f"warmup_batches={cfg['warmup_batches']}: must be >= 0")
    for key in ("telemetry_hz", "energy_hz"):
        if not cfg[key] > 0:
            raise ConfigError(f"{key}={cfg[key]}: must be > 0 samples per second")
    if not str(cfg["data_root"]).strip():
        raise ConfigError("data_root=: must be a folder (the default ../shared/data resolves against the current folder)")
    _validate_model(cfg["model"])
    _validate_gpu(cfg["gpu"])
    _validate_dataset(cfg["dataset"], cwd, cfg["data_root"])
    _validate_paths(cfg, cwd)
    validate_launcher(cfg["launcher"])
    mode = cfg.get("fail_on_purpose")
    if mode is not None and mode != "raise" and not any(mode.startswith(prefix) and mode[len(prefix):].isdigit()
                                                        for prefix in ("raise-rank-", "kill-rank-", "hang-rank-")):
        raise ConfigError(f"fail_on_purpose={mode}: unknown; valid: raise, raise-rank-N, kill-rank-N, hang-rank-N "
                          "(N a rank), or null")


def validate_launcher(launcher: Mapping[str, Any]) -> None:
    """A resolved launcher config (also checked when resubmit changes one)."""
    for key in ("max_parallel", "time_min", "gpus_per_node", "cpus_per_gpu", "array_parallelism"):
        if key in launcher:
            _positive_int(f"launcher.{key}", launcher[key])
    if "timeout_min" in launcher and not launcher["timeout_min"] > 0:
        raise ConfigError(f"launcher.timeout_min={launcher['timeout_min']}: must be > 0 minutes")
    if launcher.get("mem_per_gpu_gb") is not None:
        _positive_int("launcher.mem_per_gpu_gb", launcher["mem_per_gpu_gb"])
    if "time_min" in launcher and "signal_delay_s" in launcher and launcher["signal_delay_s"] >= 60 * launcher["time_min"]:
        raise ConfigError(f"launcher.signal_delay_s={launcher['signal_delay_s']}: the warning before the time limit must "
                          f"come after the start; with time_min={launcher['time_min']} it must be < {60 * launcher['time_min']}")


def _validate_model(model: Mapping[str, Any]) -> None:
    for key in MODEL_POSITIVE_INTS:
        _positive_int(f"model.{key}", model[key])
    if model["n_kv_heads"] is not None:
        _positive_int("model.n_kv_heads", model["n_kv_heads"])
        if model["n_heads"] % model["n_kv_heads"]:
            raise ConfigError(
                f"model.n_kv_heads={model['n_kv_heads']}: must divide model.n_heads={model['n_heads']}"
            )
    if model["dim"] % model["n_heads"]:
        raise ConfigError(f"model.dim={model['dim']}: must be a multiple of model.n_heads={model['n_heads']}")


def _validate_gpu(gpu: Mapping[str, Any]) -> None:
    _one_of("gpu.backend", gpu["backend"], GPU_BACKENDS)
    _one_of("gpu.profile", gpu["profile"], sorted(GPU_PROFILES))
    if gpu["fail"] is not None:
        _one_of("gpu.fail", gpu["fail"], GPU_FAILS)
    if gpu["cap_tolerance_w"] < 0:
        raise ConfigError(f"gpu.cap_tolerance_w={gpu['cap_tolerance_w']}: must be >= 0 watts")


def resolve_path(path: str, cwd: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else (cwd / p)


def _validate_dataset(dataset: Mapping[str, Any], cwd: Path, data_root: str) -> None:
    name, path = dataset["name"], dataset["path"]
    _one_of("dataset", name, DATASETS)
    if name == "synthetic":
        return
    if not path:
        raise ConfigError(f"dataset={name} needs dataset.path (a {_FORMATS[name]} file)")
    file = resolve_path(path, cwd)
    problem = _dataset_problem(str(file), name)
    if problem and under_root(path, data_root) and not file.exists():
        # The default path: the data lies elsewhere, and one key moves every dataset.
        problem = (f"no such file (resolved to {file}); set data_root=FOLDER to the folder that holds "
                   f"{_LAYOUT} (now data_root={data_root}), or dataset.path=FILE")
    if problem:
        raise ConfigError(f"dataset.path={path}: {problem}")


_FORMATS = {"alpaca": "JSON list of {instruction, input, output}", "gsm8k": "JSON lines of {question, answer}"}
# Where each dataset's default file lies under data_root (hydra_conf/dataset/*.yaml).
_LAYOUT = "alpaca/alpaca_data_1k.json and gsm8k/train.jsonl"
HEAD_BYTES = 65536  # read of a dataset file at plan time: its first record (Alpaca records run to a few KiB), never the whole (GBs) file


def under_root(path: str, data_root: str) -> bool:
    """Whether ``path`` is written as a path under ``data_root`` (as the defaults are)."""
    root = data_root.rstrip("/")
    return bool(root) and path.startswith(root + "/")


MAX_LEADING_SPACE_BYTES = 1 << 20  # how far past blank lines the plan looks for the first record


@lru_cache(maxsize=64)
def _dataset_problem(path: str, name: str) -> str | None:
    """Why the file cannot be a dataset, or None. Reads only its first HEAD_BYTES.
    Cached: every cell of a sweep asks."""
    p = Path(path)
    if not p.exists():
        return f"no such file (resolved to {p}); give an existing {_FORMATS[name]} file"
    if not p.is_file():
        return f"not a file (resolved to {p}); give a {_FORMATS[name]} file"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
            while head.isspace() and len(head) < MAX_LEADING_SPACE_BYTES:  # blank lines before the first record
                more = f.read(HEAD_BYTES)
                if not more:
                    break
                head += more
    except OSError as e:
        return f"cannot be read ({e.strerror or e}; resolved to {p})"
    if not head.strip():
        return f"empty file; give a non-empty {_FORMATS[name]} file"
    if head.startswith(b"\xef\xbb\xbf"):
        return "it starts with a UTF-8 byte-order mark, which JSON readers refuse; remove it"
    whole = size <= len(head)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if whole or err.start < len(head) - 3:  # not a character cut by the read
            return f"not UTF-8 text (byte {head[err.start]:#04x}); convert it, e.g. `iconv -f latin1 -t utf-8`"
        text = head[:err.start].decode("utf-8")
    return _format_problem(text, whole, name, p)


def _format_problem(text: str, whole: bool, name: str, p: Path) -> str | None:
    """The first record against the format the worker reads (workers.load: one
    definition of each format), so a wrong file fails here, not in a queued cell."""
    from workers.load.datasets import EXPECTED, first_record_problem  # no torch: plain JSON

    problem = first_record_problem(name, text, whole)
    if problem is None and whole and name == "alpaca":
        try:
            json.loads(text)  # a small file is checked whole
        except ValueError:
            problem = "it is not valid JSON"
    if problem is None:
        return None
    other = [d for d in EXPECTED if d != name and first_record_problem(d, text, whole) is None]
    hint = f"; it looks like {other[0]} data (dataset={other[0]})" if other else ""
    return f"not {name} data (resolved to {p}): expected {EXPECTED[name]}; {problem}{hint}"


def _validate_paths(cfg: Mapping[str, Any], cwd: Path) -> None:
    weights = cfg["weights"]
    if weights != "random" and not resolve_path(weights, cwd).is_dir():
        raise ConfigError(f"weights={weights}: no such folder; valid: random, or a Meta checkpoint folder")
    tok = cfg["tokenizer"]
    if tok is not None and not resolve_path(tok, cwd).is_file():
        raise ConfigError(f"tokenizer={tok}: no such file; valid: null (byte-level) or a sentencepiece .model file")
