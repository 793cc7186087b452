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
from benchmarks.graph_timing import graph_time_us  # noqa: E402
from workers.model import fused  # noqa: E402

# (name, out_features, in_features): the row-parallel products, then (products only,
# no consumer fused) the column-parallel ones
SHAPES_7B = [("wo", 4096, 4096), ("w2", 4096, 11008)]
SHAPES_COLUMN = [("wqkv", 3 * 4096, 4096), ("w13", 2 * 11008, 4096)]
EPS = 1e-5


def bench(n: int, k: int, m: int, splits: list[int], rotate_bytes: int, device: torch.device,
          chain: bool = True) -> dict:
    copies = max(2, rotate_bytes // (n * k * 2))
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    resid = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    g = torch.ones(n, device=device, dtype=torch.bfloat16)
    ref = (resid.float() + x.float() @ weights[0].float().t())
    row: dict = {"m": m, "n": n, "k": k, "copies": copies}

    def linear_chain(w):
        return fused.ADD_RMS_NORM(resid, F.linear(x, w), g, EPS)

    row["linear_only_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in weights])
    if not chain:
        for s in splits:
            if k % s == 0:
                xs = x.view(m, s, k // s).transpose(0, 1)
                ws = [w.view(n, s, k // s).permute(1, 2, 0) for w in weights]
                row[f"bmm{s}_only_us"] = graph_time_us([lambda w=w, xs=xs: torch.bmm(xs, w) for w in ws])
        return row
    row["linear_us"] = graph_time_us([lambda w=w: linear_chain(w) for w in weights])
    got = linear_chain(weights[0])[0].float()
    row["linear_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
    for s in splits:
        if k % s:
            continue
        xs = x.view(m, s, k // s).transpose(0, 1)  # (S, m, K/S), a view
        ws = [w.view(n, s, k // s).permute(1, 2, 0) for w in weights]  # (S, K/S, N) views of W

        def bmm_chain(w, xs=xs):
            return fused.ADD_PARTIALS_RMS_NORM(resid, torch.bmm(xs, w), g, EPS)

        row[f"bmm{s}_us"] = graph_time_us([lambda w=w: bmm_chain(w) for w in ws])
        row[f"bmm{s}_only_us"] = graph_time_us([lambda w=w: torch.bmm(xs, w) for w in ws])
        got = bmm_chain(ws[0])[0].float()
        row[f"bmm{s}_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
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
        for name, n, k in SHAPES_7B:
            row = {"shape": name, **bench(n, k, m, splits, int(args.rotate_gib * 2**30), device)}
            rows.append(row)
            parts = " | ".join(f"bmm{s} {row[f'bmm{s}_us']:.1f} ({row[f'bmm{s}_only_us']:.1f})"
                               for s in splits if f"bmm{s}_us" in row)
            print(f"b{m:<3} {name}: linear+norm {row['linear_us']:.1f} us (linear {row['linear_only_us']:.1f}) | {parts}",
                  flush=True)
            torch.cuda.empty_cache()
        for name, n, k in SHAPES_COLUMN:
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
