"""Model parallel on the CPU with gloo: one shard and two shards give the same logits,
on the plain path and on the fused one (prefill and decode, run uncompiled).

A checkpoint written by a one-shard model (one file, and two files) is loaded on
two ranks, each rank reading only its slices; logits and greedy tokens must
match the one-shard model.
"""
import os

import pytest
import torch
import torch.multiprocessing as tmp

from workers.model import PRESETS, ModelArgs

ARGS = ModelArgs.from_dict({**PRESETS["llama-tiny"].to_dict(), "n_kv_heads": 4})
TOKENS = [[1, 17, 33, 5, 99, 250, 7], [1, 8, 8, 400, 3, 12, 64]]


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from workers import dist as wdist
    from workers.model import Generator, build_model, forward_full, save_checkpoint

    wdist._from_submitit = lambda: None
    wdist.init_distributed(world)
    try:
        weights = "random" if world == 1 else folder
        model = build_model(ARGS, weights=weights, dtype="float32", device="cpu", seed=11,
                            max_batch_size=2, max_seq_len=64)
        if world == 1:
            save_checkpoint(model, os.path.join(folder, "one"), n_files=1)
            save_checkpoint(model, os.path.join(folder, "two"), n_files=2)
        logits = forward_full(model, torch.tensor(TOKENS))
        new = Generator(model, max_batch_size=2, max_seq_len=64, device="cpu").generate(
            TOKENS, max_new_tokens=12, eos_id=None)
        result = {"logits": logits, "new": new}
        if world > 1:  # the fused paths (CUDA's default), uncompiled: the same all-reduces, other kernels
            from workers.model import fused

            fused.COMPILE, fused.PREFILL_MIN_ROWS = False, 0
            fused.prefill_serves = lambda head_dim, device: True
            _refuse_tma_products()
            model.fuse = True
            result["logits_fused"] = forward_full(model, torch.tensor(TOKENS))
            result["new_fused"] = Generator(model, max_batch_size=2, max_seq_len=64, device="cpu").generate(
                TOKENS, max_new_tokens=12, eos_id=None)
        if rank == 0:
            torch.save(result, out)
    finally:
        wdist.shutdown()


def _refuse_tma_products() -> None:
    """Make the TMA kernel look usable for this model and fail if called: with model
    parallelism the decode step must keep cuBLAS (not measured there)."""
    from workers.model import linear

    def refuse(*args, **kwargs):
        raise AssertionError("a model-parallel decode step took the TMA kernel")

    linear.TMA, linear.TMA_WIDTHS, linear.TMA_MAX_ROWS = True, frozenset({ARGS.dim}), 64
    linear.tma_usable = lambda x, w, slices=1, block_k=None, max_rows=64: True
    linear.tma_linear = refuse


def _free_port() -> int:
    from workers.dist import _free_port

    return _free_port()


@pytest.mark.slow
def test_one_shard_and_two_shards_agree(tmp_path):
    ref = str(tmp_path / "ref.pt")
    tmp.spawn(_worker, args=(1, _free_port(), str(tmp_path), ref), nprocs=1)
    want = torch.load(ref)
    for layout in ("one", "two"):
        got_file = str(tmp_path / f"got-{layout}.pt")
        tmp.spawn(_worker, args=(2, _free_port(), str(tmp_path / layout), got_file), nprocs=2)
        got = torch.load(got_file)
        torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
        assert got["new"] == want["new"]
        torch.testing.assert_close(got["logits_fused"], want["logits"], rtol=1e-4, atol=1e-4)
        assert got["new_fused"] == want["new"]
