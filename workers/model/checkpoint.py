"""Building the model: random weights of the exact shapes, or a Meta checkpoint
folder (``params.json`` + ``consolidated.NN.pth``) resharded to this run's
model-parallel size.

Resharding works tensor by tensor: each file is opened with ``mmap`` and only
the slices that belong to this rank are read and copied to the device, so a rank
never holds more than its own shard plus one tensor slice in host memory.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from fairscale.nn.model_parallel import initialize as mp

from orchestrator.contracts import KV_CACHE_DTYPES

from .args import ModelArgs
from .transformer import Transformer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02  # random weights: the usual GPT/LLaMA init scale; norms start at 1

# How Meta splits each tensor over model-parallel files: the dimension, or None (replicated).
_SPLIT_DIM = [
    (re.compile(r"tok_embeddings\.weight$"), 1),
    (re.compile(r"\.(wq|wk|wv|w1|w3)\.weight$|^output\.weight$"), 0),
    (re.compile(r"\.(wo|w2)\.weight$"), 1),
    (re.compile(r"norm\.weight$"), None),
]
_IGNORED_KEYS = re.compile(r"rope\.freqs$|^freqs$")


def split_dim(name: str) -> int | None:
    for pattern, dim in _SPLIT_DIM:
        if pattern.search(name):
            return dim
    raise KeyError(f"no sharding rule for checkpoint tensor {name!r}")


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(DTYPES)}")
    return DTYPES[dtype]


def _mp_rank_world() -> tuple[int, int]:
    if mp.model_parallel_is_initialized():
        return mp.get_model_parallel_rank(), mp.get_model_parallel_world_size()
    raise RuntimeError("model parallel is not initialised: call workers.dist.init_distributed first")


def build_model(args: ModelArgs, *, weights: str, dtype: str, device: str, seed: int,
                max_batch_size: int, max_seq_len: int, kv_cache_dtype: str = "auto") -> Transformer:
    """The model for this rank, weights filled, in inference mode (no grads).
    ``kv_cache_dtype``: "auto" keeps keys and values in ``dtype``; "float8_e4m3fn" stores
    them in 8 bits (unscaled, as an inference server's fp8 cache), halving the bytes a
    decode step reads from the cache."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; valid: {sorted(KV_CACHE_DTYPES)}")
    rank, world = _mp_rank_world()
    args = resolve_args(args, weights)
    args.check_shards(world)
    model = Transformer(args, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        device=device, dtype=torch_dtype(dtype),
                        kv_dtype=None if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype))
    with torch.no_grad():
        if weights == "random":
            _fill_random(model, seed=seed, mp_rank=rank)
        else:
            load_checkpoint(model, weights)
    return model.eval().requires_grad_(False)


def _fill_random(model: Transformer, *, seed: int, mp_rank: int) -> None:
    """Seeded normal init on the device itself (no host copy of the weights).
    Each rank draws its own shard, so the full model depends on the shard count."""
    gen = torch.Generator(device=model.device)
    for i, (name, p) in enumerate(model.named_parameters()):
        gen.manual_seed(seed * 1_000_003 + mp_rank * 10_007 + i)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def _checkpoint_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist; "
                                "weights must be 'random' or a folder with params.json and consolidated.NN.pth")
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"no consolidated.NN.pth files in {folder}")
    # Meta numbers the files 00..N-1: a gap is a file lost in a copy, not a smaller model.
    want = [folder / f"consolidated.{i:02d}.pth" for i in range(len(files))]
    lost = [w.name for w in want if w not in files]
    if lost:
        raise FileNotFoundError(f"{folder} has {len(files)} consolidated files but not {lost[0]}: "
                                f"the files must be consolidated.00.pth .. consolidated.{len(files) - 1:02d}.pth "
                                f"with none missing (found {', '.join(f.name for f in files)})")
    return files


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's own message does not name the file
        raise ValueError(f"cannot read checkpoint file {path} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); a truncated copy?") from None


def resolve_args(args: ModelArgs, weights: str) -> ModelArgs:
    """The model's shape as it will be built: the config's for random weights,
    the checkpoint's params.json (and embedding size) otherwise. The worker
    checks its tokenizer against this before any weight is read."""
    return args if weights == "random" else _checkpoint_args(Path(weights), args)


def _checkpoint_args(folder: Path, args: ModelArgs) -> ModelArgs:
    """The folder's params.json wins for the shape; a disagreement on the main shape is an error."""
    params_file = folder / "params.json"
    if not params_file.exists():
        return args
    try:
        params = json.loads(params_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{params_file} is not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{params_file} must hold a JSON object of model settings (dim, n_layers, n_heads, ...)")
    for key in ("dim", "n_layers", "n_heads"):
        if key in params and params[key] != getattr(args, key):
            raise ValueError(f"{params_file}: {key}={params[key]} but the model config says {getattr(args, key)}")
    merged = {**args.to_dict(), **{k: v for k, v in params.items() if k in args.to_dict()}}
    if merged.get("vocab_size", -1) <= 0:  # LLaMA-1 writes -1: read it from the embedding table
        first = _load_file(_checkpoint_files(folder)[0])
        merged["vocab_size"] = int(first["tok_embeddings.weight"].shape[0])
    return ModelArgs.from_dict(merged)


def load_checkpoint(model: Transformer, folder: str | os.PathLike[str]) -> None:
    """Copy this rank's slice of every tensor from the checkpoint files into ``model``."""
    files = _checkpoint_files(Path(folder))
    rank, world = _mp_rank_world()
    opened: dict[int, dict[str, torch.Tensor]] = {}

    def file(i: int) -> dict[str, torch.Tensor]:
        if i not in opened:
            opened[i] = _load_file(files[i])
        return opened[i]

    params = dict(model.named_parameters())
    missing = set(params) - set(file(0))
    if missing:
        raise KeyError(f"{files[0]} lacks {sorted(missing)[:3]} (and {max(0, len(missing) - 3)} more)")
    # Tensors the model has no place for (more layers than params.json or the
    # config say): loading the rest would run a different model than the file's.
    extra = sorted(k for k in file(0) if k not in params and not _IGNORED_KEYS.search(k))
    if extra:
        raise ValueError(f"{files[0]} holds {len(extra)} tensor(s) this model has no place for, e.g. {extra[:3]}: "
                         f"the checkpoint is larger than the model (n_layers={model.args.n_layers}); "
                         f"check params.json and model.* settings")
    for name, p in params.items():
        piece = _slice_for_rank(name, tuple(p.shape), file, len(files), rank, world, files[0])
        if tuple(piece.shape) != tuple(p.shape):
            raise ValueError(f"{files[0].parent}: {name} is {tuple(piece.shape)} for this shard but the model "
                             f"expects {tuple(p.shape)}; params.json (vocab_size, dim, ...) does not match the tensors")
        p.copy_(piece)
    opened.clear()


def _slice_for_rank(name: str, shape: tuple[int, ...], file, n_files: int, rank: int, world: int,
                    first: Path) -> torch.Tensor:
    dim = split_dim(name)
    if dim is None:
        return file(0)[name]
    part = file(0)[name].shape[dim]
    if part * n_files != shape[dim] * world:
        raise ValueError(f"{first.parent}: {name} has {part} x {n_files} files along dim {dim}, "
                         f"but the model needs {shape[dim]} x {world} shards ({part * n_files} against "
                         f"{shape[dim] * world} in all): is a consolidated.NN.pth file missing, or does "
                         f"params.json not match the tensors?")
    lo, hi = rank * shape[dim], (rank + 1) * shape[dim]
    pieces = []
    for f in range(lo // part, (hi - 1) // part + 1):
        a, b = max(lo, f * part) - f * part, min(hi, (f + 1) * part) - f * part
        pieces.append(file(f)[name].narrow(dim, a, b - a))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def save_checkpoint(model: Transformer, folder: str | os.PathLike[str], n_files: int) -> None:
    """Write ``model`` in Meta's layout with ``n_files`` consolidated files.

    From a single-shard model any ``n_files`` dividing the split widths; from a
    sharded model, ``n_files`` equal to the shard count (each rank writes its own)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = _mp_rank_world()
    if world != 1 and n_files != world:
        raise ValueError(f"a model on {world} shards can be saved as {world} files, not {n_files}")
    if rank == 0:
        (out / "params.json").write_text(json.dumps(model.args.to_dict(), indent=2))
    state = {name: p.detach().cpu() for name, p in model.named_parameters()}
    own = [rank] if world > 1 else range(n_files)
    for i in own:
        shard = {}
        for name, t in state.items():
            dim = split_dim(name)
            if dim is not None and world == 1:
                if t.shape[dim] % n_files:
                    raise ValueError(f"{name}: {t.shape[dim]} along dim {dim} does not split into {n_files} files")
                t = t.chunk(n_files, dim=dim)[i]
            shard[name] = t.clone()  # clone: a view would save the whole storage
        torch.save(shard, out / f"consolidated.{i:02d}.pth")
