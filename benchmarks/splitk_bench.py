"""Row-parallel products at batch 1: cuBLAS split-K against partial sums folded into the next norm.

At batch 1 the output projection (``wo``) and the down projection (``w2``) have
few output tiles for the card's SMs, so cuBLAS splits the inner dimension and
runs a second kernel that adds the partial results. This times, inside one CUDA
graph (as the generator runs the step), the product followed by the residual
add + RMSNorm that comes next in a layer:

- ``linear``: ``F.linear`` then the compiled add + RMSNorm (what the step runs);
- ``bmm-S``: the inner dimension cut into S slices as one batched product
  (``torch.bmm``, S partial outputs), the S partials summed in float32 inside the
  compiled add + RMSNorm, so no separate reduce kernel runs.

Weights rotate through more memory than the L2 cache holds.

    python benchmarks/splitk_bench.py --batch-sizes 1,8 --splits 2,4,8 --out splitk_bench.json
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
from benchmarks.gemv_bench import SHAPES_7B  # noqa: E402
from benchmarks.graph_timing import graph_time_us  # noqa: E402
from workers.model import fused, linear  # noqa: E402

# (name, out_features, in_features): the row-parallel products, timed with the norm
# that takes their sum; the column-parallel ones as products only (no consumer fused)
ROW_SHAPES = [s for s in SHAPES_7B if s[0] in ("wo", "w2")]
COLUMN_SHAPES = [s for s in SHAPES_7B if s[0] in ("wqkv", "w13")]
EPS = 1e-5


def bench(n: int, k: int, m: int, splits: list[int], rotate_bytes: int, device: torch.device,
          chain: bool = True) -> dict:
    """Products alone (``*_only_us``) and, with ``chain``, followed by the add + norm."""
    copies = max(2, rotate_bytes // (n * k * 2))
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    resid = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    g = torch.ones(n, device=device, dtype=torch.bfloat16)
    ref = (resid.float() + x.float() @ weights[0].float().t())
    row: dict = {"m": m, "n": n, "k": k, "copies": copies}
    variants = {"linear": (lambda w: F.linear(x, w), fused.ADD_RMS_NORM)}
    variants.update({f"bmm{s}": (lambda w, s=s: linear.partial_products(x, w, s), fused.ADD_PARTIALS_RMS_NORM)
                     for s in splits if k % s == 0})
    for name, (product, norm) in variants.items():
        row[f"{name}_only_us"] = graph_time_us([lambda w=w: product(w) for w in weights])
        if chain:
            row[f"{name}_us"] = graph_time_us([lambda w=w: norm(resid, product(w), g, EPS) for w in weights])
            got = norm(resid, product(weights[0]), g, EPS)[0].float()
            row[f"{name}_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--splits", default="2,4,8,16")
    p.add_argument("--rotate-gib", type=float, default=2.0)
    p.add_argument("--out", default="splitk_bench.json")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    splits = [int(s) for s in args.splits.split(",")]
    rows = []
    for m in (int(b) for b in args.batch_sizes.split(",")):
        for name, n, k in ROW_SHAPES:
            row = {"shape": name, **bench(n, k, m, splits, int(args.rotate_gib * 2**30), device)}
            rows.append(row)
            parts = " | ".join(f"bmm{s} {row[f'bmm{s}_us']:.1f} ({row[f'bmm{s}_only_us']:.1f})"
                               for s in splits if f"bmm{s}_us" in row)
            print(f"b{m:<3} {name}: linear+norm {row['linear_us']:.1f} us (linear {row['linear_only_us']:.1f}) | {parts}",
                  flush=True)
            torch.cuda.empty_cache()
        for name, n, k in COLUMN_SHAPES:
            row = {"shape": name, **bench(n, k, m, splits, int(args.rotate_gib * 2**30), device, chain=False)}
            rows.append(row)
            parts = " | ".join(f"bmm{s} {row[f'bmm{s}_only_us']:.1f}" for s in splits if f"bmm{s}_only_us" in row)
            print(f"b{m:<3} {name}: linear {row['linear_only_us']:.1f} us | {parts}", flush=True)
            torch.cuda.empty_cache()
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python3", *sys.argv]), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
