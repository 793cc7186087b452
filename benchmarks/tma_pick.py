"""The TMA kernel's launch settings that stream each of a decode step's products fastest,
from a ``gemv_bench.py --tma`` report: for q/k/v and w1/w3 taken whole, for wo and w2 in
linear.SPLIT_K_SLICES slices (as the step takes them), at the given row count. Prints them
as ``decode_bench.py --tma-alt`` takes them, so that one device session can find settings
and measure the whole step with them against the defaults.

    python3 benchmarks/tma_pick.py gemv_bench.json [--rows 1] [--slices 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

WHOLE = ("wqkv", "w13")
PARTIAL = ("wo", "w2")


def pick(rows: list[dict], m: int, role: str, slices: int) -> str | None:
    """The fastest setting ("BN,BK,W,S") of product ``role`` at ``m`` rows in ``slices`` slices."""
    timed = [r["tma_us_all"] for r in rows if r.get("m") == m and r.get("shape") == role and "tma_us_all" in r]
    options = {key.split(":", 1)[1]: us for t in timed for key, us in t.items() if int(key.split(":")[0]) == slices}
    if not options:
        return None
    best = min(options, key=options.get)
    return ",".join(v.strip() for v in best.strip("()").split(","))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", help="the JSON that gemv_bench.py --tma --out wrote")
    p.add_argument("--rows", type=int, default=1, help="activation rows (batch size) to choose for")
    p.add_argument("--slices", type=int, default=2, help="K slices of wo and w2 (linear.SPLIT_K_SLICES)")
    args = p.parse_args(argv)
    rows = json.loads(Path(args.report).read_text())["rows"]
    picks = {role: pick(rows, args.rows, role, 1) for role in WHOLE}
    picks |= {role: pick(rows, args.rows, role, args.slices) for role in PARTIAL}
    missing = [role for role, cfg in picks.items() if cfg is None]
    if missing:
        print(f"tma_pick: {args.report} has no TMA timings of {missing} at {args.rows} row(s)", file=sys.stderr)
        return 1
    print(";".join(f"{role}={cfg}" for role, cfg in picks.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
