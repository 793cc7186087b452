"""Prefill time for batches of new widths: what a sweep's measured window pays per batch.

Prompt batches differ in padded width, so every batch of a cell can be a shape the
process has not run before. This times ``forward_full`` (the prefill) of LLaMA-7B at
batch 64 for a run of new widths, then the same widths again, with the worker's
prefill backends (cuDNN left out) and with PyTorch's default order (cuDNN first on
Hopper, which builds a plan per new shape).

    python benchmarks/prefill_shapes.py --widths 100,101,102,103,104
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workers.dist import init_distributed  # noqa: E402
from workers.model import PRESETS, build_model, generate  # noqa: E402


def _time(model, b: int, width: int, vocab: int) -> float:
    tokens = torch.randint(3, vocab, (b, width))
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        generate.forward_full(model, tokens, last_only=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--widths", default="100,101,102,103,104")
    args = p.parse_args(argv)
    init_distributed(1)
    shape = PRESETS[args.model]
    model = build_model(shape, weights="random", dtype="bfloat16", device="cuda", seed=0,
                        max_batch_size=args.batch_size, max_seq_len=256)
    widths = [int(w) for w in args.widths.split(",")]
    _time(model, args.batch_size, 64, shape.vocab_size)  # CUDA context, cuBLAS handles
    variants = {"worker (no cuDNN)": generate.PREFILL_SDPA,
                "cuDNN first": (SDPBackend.CUDNN_ATTENTION, *generate.PREFILL_SDPA)}
    offset = 0
    for name, backends in variants.items():
        generate.PREFILL_SDPA = backends
        ws = [w + offset for w in widths]  # widths neither variant has run
        first = [_time(model, args.batch_size, w, shape.vocab_size) for w in ws]
        again = [_time(model, args.batch_size, w, shape.vocab_size) for w in ws]
        print(f"{name:18s} first time per width: {' '.join(f'{1e3 * t:7.1f}' for t in first)} ms; "
              f"again: {' '.join(f'{1e3 * t:7.1f}' for t in again)} ms", flush=True)
        offset += 20
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
