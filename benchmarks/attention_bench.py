"""Decode attention alone: SDPA over a key bucket with a mask against the used-slots kernel.

LLaMA-7B's attention shape (32 heads of 128, bf16) on one GPU: per batch size and
cache position, the GPU time of one layer's decode attention (mask building
included for SDPA) and the bytes of keys and values it must read (the used slots
only) over that time. Each time is the median over 15 replays of a CUDA graph
of 32 calls, so host overhead is not counted, as in the generator's graphs.

    python benchmarks/attention_bench.py --batch-sizes 1,8,64 --out attention_bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.graph_timing import graph_time_us  # noqa: E402
from workers.model import attention  # noqa: E402
from workers.model.attention import decode_attention, plan_splits  # noqa: E402


def _time_us(fn, calls: int = 32) -> float:
    """GPU time of one call: ``calls`` calls in one CUDA graph (as the decode step runs
    them, no host work between kernels), median over replays."""
    return graph_time_us([fn] * calls)


def sdpa_bucket(q, k, v, pads, pos, n: int):
    """The fused-sdpa step's attention: keys up to the bucket of ``n``, an additive mask."""
    keys = torch.arange(n, device=q.device)
    allowed = (keys[None, :] >= pads[:, None]) & (keys[None, :] <= pos)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], attn_mask=mask.view(-1, 1, 1, n))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--max-seq-len", type=int, default=384)
    p.add_argument("--positions", default="255,383", help="last cache slot written (keys 0..pos are used)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--configs", default="default,64:16:4:3,64:4:4:3,32:16:4:2,128:4:8:3",
                   help="kernel configurations to try, BLOCK_N:MAX_SPLITS:NUM_WARPS:NUM_STAGES, "
                        "or 'default' (the module's settings)")
    p.add_argument("--fp8", action="store_true", help="also time the kernel on a float8_e4m3fn cache")
    p.add_argument("--out", default="attention_bench.json")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    defaults = attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES  # launch settings the bench varies
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        shape = (b, args.heads, args.max_seq_len, args.head_dim)
        k = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        v = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        q = torch.randn(b, args.heads, 1, args.head_dim, device=dev, dtype=torch.bfloat16)
        pads = torch.zeros(b, dtype=torch.long, device=dev)
        for last in [int(x) for x in args.positions.split(",")]:
            pos = torch.tensor([last], device=dev)
            used_bytes = 2 * b * args.heads * (last + 1) * args.head_dim * 2
            n = min(-(-(last + 1) // 32) * 32, args.max_seq_len)
            variants = {"sdpa-bucket32 (+mask)": (lambda n=n: sdpa_bucket(q, k, v, pads, pos, n), None)}
            caches = {"": (k, v)}
            if args.fp8:  # what an 8-bit cache would read, through the same kernels
                caches[" fp8"] = (k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))
            for cfg in args.configs.split(","):
                if cfg == "default":  # the module's own choice of splits for this batch
                    settings, max_splits, label = defaults, None, "default"
                else:
                    block_n, max_splits, warps, stages = (int(x) for x in cfg.split(":"))
                    settings = (block_n, warps, stages)
                    splits, chunk = plan_splits(args.max_seq_len, block_n, max_splits)
                    label = f"{cfg} ({splits}x{chunk})"
                for tag, (kc, vc) in caches.items():
                    variants[f"{label}{tag}"] = (
                        lambda ms=max_splits, kc=kc, vc=vc: decode_attention(q, kc, vc, pads, pos, splits=ms),
                        settings)
            for name, (fn, settings) in variants.items():
                attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES = settings or defaults
                us = _time_us(fn)
                attention.BLOCK_N, attention.NUM_WARPS, attention.NUM_STAGES = defaults
                rows.append({"batch_size": b, "pos": last, "variant": name, "us": us,
                             "used_kv_gb_s": used_bytes / us / 1e3})
                print(f"b={b:3d} pos={last:4d} {name:36s} {us:8.2f} us  {used_bytes / us / 1e3:7.1f} GB/s", flush=True)
    Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                                          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "command": " ".join(sys.argv), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
