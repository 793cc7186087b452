"""Which cells can run: heads and widths divisible by shards, memory fit on
``shards`` cards of the planned GPU profile, cap inside the card's range, and
the site's power-cap policy (a breach stops the whole sweep at plan time).

Infeasible cells stay in the plan with their reason and are never launched.
"""
from __future__ import annotations

import getpass
import math
from typing import Any, Iterable, Mapping, Protocol

from orchestrator.contracts import GPU_PROFILES, CellParams, GpuProfile
from orchestrator.plan.planned import PlannedCell

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
MEMORY_OVERHEAD = 1.10  # activations, allocator slack, CUDA context: ~10% over weights + KV cache
GiB = float(1 << 30)


class PolicyError(ValueError):
    """A cell breaks the site's power-cap policy; nothing of the sweep is submitted."""


class _ComposedCellLike(Protocol):
    params: CellParams
    options: Any
    launcher: Mapping[str, Any]


# ---------------------------------------------------------------------------
# Model arithmetic (LLaMA shapes as in Meta's reference model)
# ---------------------------------------------------------------------------


def ffn_hidden_dim(args: Mapping[str, Any]) -> int:
    """LLaMA's FFN width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * args["dim"] / 3)
    if args.get("ffn_dim_multiplier") is not None:
        hidden = int(args["ffn_dim_multiplier"] * hidden)
    m = args["multiple_of"]
    return m * ((hidden + m - 1) // m)


def n_kv_heads(args: Mapping[str, Any]) -> int:
    return args.get("n_kv_heads") or args["n_heads"]


def parameter_count(args: Mapping[str, Any]) -> int:
    dim, layers, vocab = args["dim"], args["n_layers"], args["vocab_size"]
    head_dim = dim // args["n_heads"]
    kv_dim = n_kv_heads(args) * head_dim
    attention = 2 * dim * dim + 2 * dim * kv_dim  # wq, wo, wk, wv
    ffn = 3 * dim * ffn_hidden_dim(args)  # w1, w2, w3
    per_layer = attention + ffn + 2 * dim  # two RMSNorms
    return layers * per_layer + 2 * vocab * dim + dim  # embedding, output, final norm


def kv_cache_bytes(params: CellParams) -> int:
    """Static cache: keys and values for batch x (prompt + generated) tokens, every layer."""
    args = params.model_args
    head_dim = args["dim"] // args["n_heads"]
    tokens = params.batch_size * (params.max_prompt_tokens + params.max_new_tokens)
    kv_dtype = params.dtype if params.kv_cache_dtype == "auto" else params.kv_cache_dtype
    return 2 * args["n_layers"] * tokens * n_kv_heads(args) * head_dim * DTYPE_BYTES[kv_dtype]


def memory_needed_bytes(params: CellParams) -> int:
    weights = parameter_count(params.model_args) * DTYPE_BYTES[params.dtype]
    return int((weights + kv_cache_bytes(params)) * MEMORY_OVERHEAD)


# ---------------------------------------------------------------------------
# Feasibility
# ---------------------------------------------------------------------------


def model_splits(args: Mapping[str, Any]) -> list[tuple[str, int]]:
    """What model parallelism cuts into ``shards`` equal parts."""
    return [
        ("n_heads", args["n_heads"]),
        ("n_kv_heads", n_kv_heads(args)),
        ("dim", args["dim"]),
        ("vocab_size", args["vocab_size"]),
        ("FFN width", ffn_hidden_dim(args)),
    ]


def valid_shard_counts(args: Mapping[str, Any]) -> list[int]:
    """Every shard count that divides all the splits (the heads bound them)."""
    splits = [n for _, n in model_splits(args)]
    return [d for d in range(1, min(splits) + 1) if all(n % d == 0 for n in splits)]


def fewest_shards_that_fit(params: CellParams, profile: GpuProfile) -> int | None:
    """The smallest valid shard count whose cards hold the cell, or None if none does."""
    need = memory_needed_bytes(params)
    return next((d for d in valid_shard_counts(params.model_args) if d * profile.memory_bytes >= need), None)


def infeasible_reason(params: CellParams, profile: GpuProfile) -> str | None:
    """Why this cell cannot run, or None."""
    args, shards = params.model_args, params.shards
    for what, n in model_splits(args):
        if n % shards:
            valid = valid_shard_counts(args)[-8:]
            return f"shards={shards} does not divide {what}={n} of {params.model}; valid shard counts: {', '.join(map(str, valid))}"
    total = params.max_prompt_tokens + params.max_new_tokens
    if total > args["max_seq_len"]:
        return (f"max_prompt_tokens + max_new_tokens = {total} exceeds {params.model}'s "
                f"max_seq_len={args['max_seq_len']}")
    need = memory_needed_bytes(params)
    have = shards * profile.memory_bytes
    if need > have:
        per_gpu = profile.memory_bytes / GiB
        return (f"needs {need / GiB:.1f} GiB (weights + KV cache + 10%) but {shards} x "
                f"{per_gpu:.0f} GiB {params.gpu_kind} = {have / GiB:.0f} GiB; {_memory_fix(params, profile)}")
    if params.kv_cache_dtype != "auto" and not profile.fp8:
        fp8_kinds = sorted(k for k, p in GPU_PROFILES.items() if p.fp8)
        return (f"kv_cache_dtype={params.kv_cache_dtype} needs 8-bit float support (compute capability "
                f"8.9+), which {params.gpu_kind} lacks; use kv_cache_dtype=auto, or gpu.profile one of "
                f"{', '.join(fp8_kinds)}")
    cap = params.power_cap_w
    if cap is not None and not (profile.min_limit_w <= cap <= profile.max_limit_w):
        return (f"power_cap_w={cap:g} outside {params.gpu_kind}'s range "
                f"{profile.min_limit_w:g}-{profile.max_limit_w:g} W")
    return None


def _memory_fix(params: CellParams, profile: GpuProfile) -> str:
    # A count that fits memory but does not split the heads would only fail on the
    # next try: suggest the fewest that does both.
    fewest = fewest_shards_that_fit(params, profile)
    if fewest is None:
        most = valid_shard_counts(params.model_args)[-1]
        return (f"even shards={most} (the most that split {params.model}'s heads) is too little; "
                f"use a smaller batch or shorter sequences")
    return f"use more shards (shards={fewest}: the fewest that split the heads and fit), a smaller batch or shorter sequences"


def nodes_for(shards: int, launcher: Mapping[str, Any]) -> int:
    """Slurm: ceil(shards / gpus_per_node); the local launcher runs on this one machine."""
    per_node = launcher.get("gpus_per_node")
    if launcher.get("name") == "local" or not per_node:
        return 1
    return max(1, math.ceil(shards / int(per_node)))


def check_policy(cells: Iterable[PlannedCell]) -> None:
    """Ask the site policy (gpu.policy) about each feasible cell; raise PolicyError on a breach."""
    loaded: dict[str, Any] = {}
    user = getpass.getuser()
    for cell in cells:
        path = cell.options.policy_path
        if not path or not cell.feasible:
            continue
        if path not in loaded:
            loaded[path] = _load_policy(path)
        profile = GPU_PROFILES[cell.params.gpu_kind]
        breach = loaded[path].check(
            gpu_name=profile.name,
            partition=cell.launcher.get("partition"),
            power_cap_w=cell.params.power_cap_w,
            user=user,
            account=cell.launcher.get("account"),
        )
        if breach:
            cap = "uncapped" if cell.params.power_cap_w is None else f"power_cap_w={cell.params.power_cap_w:g}"
            raise PolicyError(f"cell {cell.cell_id} ({cell.params.model}, {cap}) breaks the site policy {path}: {breach}")


def _load_policy(path: str) -> Any:
    try:
        from workers.gpu.policy import load_policy  # lazy: written in the GPU room
    except ImportError:
        raise PolicyError(f"gpu.policy={path} is set but this installation cannot read policies (workers.gpu.policy missing); unset gpu.policy") from None
    try:
        return load_policy(path)
    except (OSError, ValueError) as e:
        raise PolicyError(f"gpu.policy={path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def host_memory_reason(params: CellParams, cpu_memory_bytes: int, parallel: int = 1) -> str | None:
    """Why a cell that runs on this machine's CPU (no NVIDIA GPU here) cannot, or None:
    its weights and KV cache must fit in its share of the memory the machine has
    available, with ``parallel`` cells (launcher.max_parallel) running at once."""
    need, share = memory_needed_bytes(params), cpu_memory_bytes // max(1, parallel)
    if need <= share:
        return None
    shared = f", {share / GiB:.1f} GiB for each of launcher.max_parallel={parallel} cells at once" if parallel > 1 else ""
    return (f"runs on this machine's CPU (no NVIDIA GPU here; telemetry simulated) and needs "
            f"{need / GiB:.1f} GiB (weights + KV cache + 10%), but {cpu_memory_bytes / GiB:.1f} GiB of "
            f"memory is available{shared}; use model=llama-tiny here, or launcher=slurm to run on GPU nodes")


def plan_cells(composed: Any, cpu_memory_bytes: int | None = None) -> list[PlannedCell]:
    """Each composed cell with its id, nodes and feasibility; duplicates collapse
    to the first; PolicyError if a feasible cell breaks the site policy.
    ``cpu_memory_bytes``: the local launcher on a machine without an NVIDIA GPU
    (``submit.local.cpu_memory_bytes``), where cells run on the CPU; local cells
    whose model does not fit in it are infeasible."""
    planned: dict[str, PlannedCell] = {}
    for cell in composed.cells:
        cid = cell.params.cell_id
        if cid in planned:
            continue
        reason = infeasible_reason(cell.params, GPU_PROFILES[cell.params.gpu_kind])
        if reason is None and cpu_memory_bytes is not None and cell.launcher.get("name") == "local":
            reason = host_memory_reason(cell.params, cpu_memory_bytes, int(cell.launcher.get("max_parallel") or 1))
        planned[cid] = PlannedCell(
            cell_id=cid,
            params=cell.params,
            options=cell.options,
            launcher=dict(cell.launcher),
            nodes=nodes_for(cell.params.shards, cell.launcher),
            feasible=reason is None,
            reason=reason,
        )
    cells = list(planned.values())
    check_policy(cells)
    return cells
