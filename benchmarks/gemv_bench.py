"""The decode step's matrix products alone: cuBLAS against a Triton skinny-matrix kernel.

At batch 1 a decode step is a chain of matrix-vector products that each stream one
weight matrix from memory; how close each comes to the card's bandwidth bounds the
whole step. For LLaMA-7B's shapes (bf16) and a few batch sizes, this times
``F.linear`` (cuBLAS) and ``workers.model.linear.skinny_linear`` (Triton) on
weights that rotate through more memory than the L2 cache holds, inside a CUDA
graph (as the generator runs them), and reports the weight bytes read per second.

    python benchmarks/gemv_bench.py --batch-sizes 1,8,64 --out gemv_bench.json
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
from benchmarks.graph_timing import capture, graph_time_us  # noqa: E402
from benchmarks.tma_linear import persistent_linear  # noqa: E402
from workers.model import linear  # noqa: E402

# (name, out_features, in_features) of LLaMA-7B's decode products
SHAPES_7B = [("wqkv", 3 * 4096, 4096), ("wo", 4096, 4096), ("w13", 2 * 11008, 4096),
             ("w2", 4096, 11008), ("output", 32000, 4096)]


def _graph_energy_uj(fns: list, card, seconds: float = 1.5) -> float | None:
    """Energy per call (microjoules) from the card's energy counter over ~``seconds`` of
    back-to-back graph replays, after as long again of warm-up (power settles)."""
    if card.backend is None:
        return None
    graph = capture(fns)
    start = time.perf_counter()
    replays = 0
    while time.perf_counter() - start < seconds:
        graph.replay()
        replays += 1
        if replays % 50 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    e0 = card.energy_j()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (card.energy_j() - e0) * 1e6 / (replays * len(fns))


def bench_shape(n: int, k: int, m: int, device: torch.device, rotate_bytes: int, card=None) -> dict:
    copies = max(2, rotate_bytes // (n * k * 2))
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()
    got = linear.skinny_linear(x, weights[0]).float()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    out = {"m": m, "n": n, "k": k, "max_rel_err": err, "decode_uses_triton": linear.usable(x, n)}
    us = graph_time_us([lambda w=w: F.linear(x, w) for w in weights])
    out.update(cublas_us=us, cublas_tb_s=n * k * 2 / us / 1e6)
    # every launch setting of the Triton kernel; the best one is reported as "triton"
    per_config = {}
    for cfg in linear.CONFIGS:
        try:
            per_config[str(cfg)] = graph_time_us([lambda w=w, c=cfg: linear.skinny_linear(x, w, c)
                                                   for w in weights])
        except Exception as exc:  # e.g. more shared memory than the card has at this row count
            print(f"  {cfg}: {type(exc).__name__}", flush=True)
    default_us = graph_time_us([lambda w=w: linear.skinny_linear(x, w) for w in weights])
    if card is not None:
        out["cublas_uj"] = _graph_energy_uj([lambda w=w: F.linear(x, w) for w in weights], card)
        out["triton_default_uj"] = _graph_energy_uj([lambda w=w: linear.skinny_linear(x, w) for w in weights], card)
    best = min(per_config, key=per_config.get)
    out.update(triton_us=per_config[best], triton_tb_s=n * k * 2 / per_config[best] / 1e6, triton_config=best,
               triton_default_us=default_us, triton_configs_us=per_config)
    return out


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the TMA kernel swept by --tma
TMA_CONFIGS = [(64, 128, 4, 4), (64, 128, 4, 6), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 8)]


def _current(x: torch.Tensor, w: torch.Tensor, name: str) -> torch.Tensor:
    """The product as the decode step runs it now: partial products for the row-parallel
    ones (wo, w2) where the step takes them, F.linear otherwise."""
    if name in ("wo", "w2") and linear.split_k_usable(x, w):
        return linear.partial_products(x, w)
    return F.linear(x, w)


def bench_tma(name: str, n: int, k: int, m: int, device: torch.device, rotate_bytes: int, card=None,
              programs: tuple[int, ...] = (), configs: list[tuple[int, int, int, int]] | None = None) -> dict:
    """The decode step's product now against the TMA kernel over its launch settings and
    K slices, then the best setting as a persistent kernel on fewer programs (SMs);
    each by energy too when ``card`` is given."""
    copies = max(2, rotate_bytes // (n * k * 2))
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    ref = F.linear(x, weights[0]).float()

    def product(w, slices, cfg, progs):
        if progs is None:
            return linear.tma_linear(x, w, slices, cfg)
        return persistent_linear(x, w, slices, cfg, progs)

    def run(slices, cfg, progs=None):
        return [lambda w=w: product(w, slices, cfg, progs) for w in weights]

    def checked(slices, cfg, progs=None):
        got = product(weights[0], slices, cfg, progs).float()
        got = got if slices == 1 else got.sum(0)
        err = ((got - ref).abs().max() / ref.abs().max()).item()
        if err > 2e-2:
            raise AssertionError(f"error {err:.1e}")
        return graph_time_us(run(slices, cfg, progs))

    now = [lambda w=w: _current(x, w, name) for w in weights]
    out = {"shape": name, "m": m, "n": n, "k": k, "now_us": graph_time_us(now)}
    per = {}
    for slices in ((1,) if n > linear.NARROW_N else (1, 2, 4)):  # wide outputs have programs enough
        for cfg in configs or TMA_CONFIGS:
            if linear.tma_usable(x, weights[0], slices, cfg[1]):
                try:
                    per[(slices, cfg)] = checked(slices, cfg)
                except Exception as exc:
                    print(f"  tma {slices}:{cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    if not per:
        return out
    slices, cfg = best = min(per, key=per.get)
    out.update(tma_us=per[best], tma_best=f"{slices}:{cfg}",
               tma_us_all={f"{s}:{c}": us for (s, c), us in per.items()})
    if card is not None:
        out["now_uj"] = _graph_energy_uj(now, card)
        out["tma_uj"] = _graph_energy_uj(run(slices, cfg), card)
    out["persistent"] = []
    for progs in programs:
        entry = {"programs": progs, "us": checked(slices, cfg, progs)}
        if card is not None:
            entry["uj"] = _graph_energy_uj(run(slices, cfg, progs), card)
        out["persistent"].append(entry)
    return out


def _energy(row: dict) -> str:
    if row.get("cublas_uj") is None:
        return ""
    return f"; energy cuBLAS {row['cublas_uj']:.0f} uJ, default {row['triton_default_uj']:.0f} uJ"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--rotate-gib", type=float, default=2.0, help="weights rotated through, per shape")
    p.add_argument("--out", default="gemv_bench.json")
    p.add_argument("--energy", action="store_true", help="also energy per call from the NVML counter (observe only)")
    p.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES_7B))
    p.add_argument("--tma", action="store_true",
                   help="the decode step's products now against the TMA kernel (benchmarks/tma_linear.py) instead")
    p.add_argument("--programs", default="", help="with --tma: also the persistent TMA kernel on these many programs")
    p.add_argument("--tma-configs", default="",
                   help="with --tma: the launch settings to sweep, BLOCK_N,BLOCK_K,warps,stages separated by "
                        f"';' (default {';'.join(','.join(map(str, c)) for c in TMA_CONFIGS)})")
    args = p.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in c.split(",")) for c in args.tma_configs.split(";") if c.strip()]
    except ValueError:
        configs = [()]
    if any(len(c) != 4 for c in configs):
        p.error(f"--tma-configs {args.tma_configs!r}: each setting is BLOCK_N,BLOCK_K,warps,stages")
    device = torch.device("cuda")
    card = None
    if args.energy:
        from benchmarks.decode_bench import Card

        card = Card.open(device)
    rows = []
    for m in (int(b) for b in args.batch_sizes.split(",")):
        for name, n, k in (shape for shape in SHAPES_7B if shape[0] in args.shapes.split(",")):
            if args.tma:
                row = bench_tma(name, n, k, m, device, int(args.rotate_gib * 2**30), card,
                                tuple(int(p) for p in args.programs.split(",") if p), configs)
                rows.append(row)
                bw = n * k * 2 / 1e6
                extra = (f" | TMA {row['tma_us']:7.1f} us {bw / row['tma_us']:5.2f} TB/s {row['tma_best']}"
                         if "tma_us" in row else " | TMA -")
                if row.get("now_uj") is not None:
                    extra += f"; energy now {row['now_uj']:.0f} uJ, TMA {row['tma_uj']:.0f} uJ"
                print(f"b{m:<3} {name:7s} now {row['now_us']:7.1f} us {bw / row['now_us']:5.2f} TB/s{extra}", flush=True)
                for entry in row.get("persistent", []):
                    uj = f", {entry['uj']:.0f} uJ" if entry.get("uj") is not None else ""
                    print(f"      persistent on {entry['programs']:3d} programs: {entry['us']:7.1f} us "
                          f"{bw / entry['us']:5.2f} TB/s{uj}", flush=True)
                torch.cuda.empty_cache()
                continue
            row = {"shape": name, **bench_shape(n, k, m, device, int(args.rotate_gib * 2**30), card)}
            rows.append(row)
            print(f"b{m:<3} {name:7s} cuBLAS {row['cublas_us']:8.1f} us {row['cublas_tb_s']:5.2f} TB/s | "
                  f"Triton {row['triton_us']:8.1f} us {row['triton_tb_s']:5.2f} TB/s {row['triton_config']} "
                  f"(default {row['triton_default_us']:.1f}{_energy(row)}) | decode uses {'Triton' if row['decode_uses_triton'] else 'cuBLAS'} | err {row['max_rel_err']:.1e}",
                  flush=True)
            torch.cuda.empty_cache()
    report = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": " ".join(["python3", *sys.argv]), "settings": linear.settings(), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
