"""Typed schemas of the sweep config, registered in Hydra's ConfigStore.

The values live in ``hydra_conf/`` (YAML); these dataclasses give them types,
so that a typo in a key or a value of the wrong type fails at composition.
Launchers differ in their fields: each launcher YAML pulls its own schema
(``defaults: [base_local]`` / ``[base_slurm]``) from the ``launcher`` group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConf:
    """A LLaMA shape (Meta's params.json fields)."""

    name: str = MISSING  # the config name, recorded in every cell
    dim: int = MISSING
    n_layers: int = MISSING
    n_heads: int = MISSING
    n_kv_heads: Optional[int] = None  # None: same as n_heads (LLaMA 1); 8 for LLaMA 2 70B (grouped-query)
    vocab_size: int = 32000
    multiple_of: int = 256  # FFN width rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048


@dataclass
class DatasetConf:
    name: str = MISSING  # synthetic | alpaca | gsm8k
    path: Optional[str] = None  # default: under ${data_root}; relative paths resolve against the current folder


@dataclass
class LocalLauncherConf:
    name: str = "local"
    max_parallel: int = 1  # cells running at once on this machine; the rest wait in order
    timeout_min: float = 720.0  # a cell running longer is stopped (submitit's local timeout)


@dataclass
class SlurmLauncherConf:
    name: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time_min: int = 60
    gpus_per_node: int = 8
    cpus_per_gpu: int = 4
    mem_per_gpu_gb: Optional[int] = None
    gres: Optional[str] = None  # e.g. "gpu:v100:8"; None: gpu:<GPUs per node of the cell>; "": no GPU request
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    sbatch_extra: List[str] = field(default_factory=list)  # extra "#SBATCH ..." lines
    array_parallelism: int = 64  # at most this many array tasks run at once
    max_requeues: int = 3  # timeouts/preemptions requeued through submitit's checkpointing
    setup: List[str] = field(default_factory=list)  # shell lines run before the workers
    signal_delay_s: int = 90  # USR2 this long before the time limit: restore caps, requeue


@dataclass
class GpuConf:
    backend: str = "auto"  # auto | nvml | nvidia-smi | capctl | simulated
    profile: str = "v100"  # card the cells are planned for (and the simulated card); see GPU_PROFILES
    fail: Optional[str] = None  # simulated failure: permission | range | mismatch | lost
    observe: bool = False  # record the cap that would be set, never write it
    cap_tolerance_w: float = 1.0
    state_dir: Optional[str] = None
    site_ledger: Optional[str] = None
    policy: Optional[str] = None  # site power-cap policy file, checked at plan time


@dataclass
class SweepConf:
    """The top level. Everything that changes a measurement becomes a cell parameter."""

    model: ModelConf = field(default_factory=ModelConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    launcher: Any = MISSING  # LocalLauncherConf | SlurmLauncherConf, chosen by the launcher group
    gpu: GpuConf = field(default_factory=GpuConf)

    shards: int = 1  # model-parallel size = GPUs = ranks
    batch_size: int = 1
    power_cap_w: Optional[float] = None  # None: leave the card's limit as it is
    max_new_tokens: int = 256
    max_prompt_tokens: int = 256
    n_prompts: int = 4096
    seed: int = 0
    weights: str = "random"  # "random" or a Meta checkpoint folder
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    kv_cache_dtype: str = "auto"  # auto (= dtype) | float8_e4m3fn: 8-bit keys/values (H100/H200 class)
    tokenizer: Optional[str] = None  # sentencepiece .model; None = byte-level fallback
    # The folder of the datasets' default files (hydra_conf/dataset/*.yaml derive their
    # paths from it); relative: against the current folder.
    data_root: str = "../shared/data"
    sort_by_length: bool = False
    sweep_dir: str = "sweeps/${now:%Y-%m-%d_%H-%M-%S}"

    telemetry_hz: float = 10.0
    energy_hz: float = 1.0
    warmup_batches: int = 1
    cuda_graph: bool = True
    # to test failure paths: "raise" (every rank raises after loading), "raise-rank-N",
    # "kill-rank-N" (rank N dies by SIGKILL, as the out-of-memory killer ends a process),
    # "hang-rank-N" (rank N stops answering and ignores SIGTERM, as a rank hung in a driver call)
    fail_on_purpose: Optional[str] = None
    sleep_s: float = 0.0  # extra decode-time sleep per batch (to catch a cell while it runs)

    # Sub-grids of a preset (+experiment=...): each maps a key to a sweep value
    # such as "1,2,4"; the sweep is the union of their cross products.
    grid: List[Any] = field(default_factory=list)
    description: Optional[str] = None  # what a preset reproduces


CONFIG_GROUPS = ("model", "dataset", "launcher", "gpu", "experiment")


def register_configs() -> None:
    """Register the schemas (idempotent: ConfigStore replaces same-named nodes)."""
    cs = ConfigStore.instance()
    cs.store(name="sweep_schema", node=SweepConf)
    cs.store(group="launcher", name="base_local", node=LocalLauncherConf)
    cs.store(group="launcher", name="base_slurm", node=SlurmLauncherConf)
