"""Decode speed and energy of the worker's generator on one GPU.

For each model shape and batch size: tokens/s, J/token (NVML energy counter
over the timed window), mean W, and the fraction of the weight-streaming
roofline (bytes of weights read per decode step over the card's copy bandwidth,
measured in the same run). CUDA graph on vs off, the 10 Hz instant-power
sampler on vs off, and (``--steps``) variants of the decode step, in the same
run. Warm-up is excluded; every window starts
and ends on a device synchronise.

    python benchmarks/decode_bench.py --models llama-7b --batch-sizes 1,8,64 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from workers.dist import init_distributed, shutdown  # noqa: E402
from workers.model import PRESETS, Generator, attention, build_model, fused, linear  # noqa: E402
from benchmarks.tma_pick import PARTIAL, WHOLE  # noqa: E402


def copy_bandwidth_bytes_s(device: torch.device, n_bytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read plus bytes written per second (median of reps)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times[3:])


@dataclass
class Card:
    """The benchmark's card through the worker's own NVML backend, in observe mode:
    nothing on the card is ever set. No backend (a CPU run, no driver): times only."""

    index: int = 0
    backend: Any = None
    name: str = "none"

    @classmethod
    def open(cls, device: torch.device) -> "Card":
        if device.type != "cuda":
            return cls()
        from workers.gpu import gpu_index_for_rank
        from workers.gpu.base import GpuError
        from workers.gpu.nvml import NvmlBackend

        try:
            backend = NvmlBackend(observe_only=True)
            index = gpu_index_for_rank(backend, device.index or 0)  # CUDA_VISIBLE_DEVICES as the worker reads it
            name = next(d.name for d in backend.devices() if d.index == index)
        except GpuError:
            return cls()
        return cls(index, backend, name)

    def energy_j(self) -> float | None:
        return None if self.backend is None else self.backend.energy_j(self.index)

    def power_limit_w(self) -> float | None:
        return None if self.backend is None else self.backend.get_power_limit_w(self.index)

    def sampler(self, hz: float) -> Any:
        """The worker's own telemetry sampler (every field it records, the energy counter
        at 1 Hz and at each phase mark) on this card."""
        from workers.telemetry.sampler import Sampler

        return Sampler(self.backend, self.index, cell_id="decode-bench", host=platform.node(), rank=0,
                       gpu_uuid="", hz=hz)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(gen: Generator, prompts: list[list[int]], new_tokens: int, reps: int, card: Card,
                device: torch.device, sampler_hz: float | None) -> dict:
    """``reps`` generate calls as one window; decode time summed from the phase marks."""
    marks: list[tuple[str, float]] = []
    sampler = card.sampler(sampler_hz) if sampler_hz else None

    def on_phase(phase: str) -> None:
        if sampler is not None:
            sampler.mark(phase)  # as the worker marks phases: rows, and a counter read off the decode path
        marks.append((phase, time.perf_counter()))  # after the mark: its counter read is in no phase's time

    if sampler:
        sampler.start()
    _sync(device)
    e0, t0 = card.energy_j(), time.perf_counter()
    tokens = 0
    for _ in range(reps):
        out = gen.generate(prompts, max_new_tokens=new_tokens, eos_id=None, on_phase=on_phase)
        marks.append(("end", time.perf_counter()))  # generate returns after a synchronise
        tokens += sum(len(o) for o in out)
    t1, e1 = time.perf_counter(), card.energy_j()
    if sampler:
        sampler.stop()
    decode_s = sum(marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1) if marks[i][0] == "decode")
    prefill_s = sum(marks[i + 1][1] - marks[i][1] for i in range(len(marks) - 1) if marks[i][0] == "prefill")
    wall = t1 - t0
    energy = None if e0 is None else e1 - e0
    res = {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "decode_s": decode_s, "decode_steps": reps * (new_tokens - 1), "prefill_ms": 1e3 * prefill_s / reps,
           "decode_step_ms": 1e3 * decode_s / (reps * (new_tokens - 1)),
           "energy_j": energy, "j_per_token": None if energy is None else energy / tokens,
           "mean_w": None if energy is None else energy / wall}
    if sampler:
        res["sampler_rows"] = sampler.rows
        res["sampler_error"] = sampler.error
    return res


def profile_step(model, prompts: list[list[int]], seq_len: int, device: torch.device, dynamic_kv: bool,
                 out: Path) -> None:
    """Kernel table of eager decode steps taking the kernels the graph replays
    (``linear.as_in_graph``), to see where time goes."""
    from torch.profiler import ProfilerActivity, profile

    gen = Generator(model, max_batch_size=len(prompts), max_seq_len=seq_len, device=str(device), cuda_graph=False,
                    dynamic_kv=dynamic_kv)
    with linear.as_in_graph():
        gen.generate(prompts, max_new_tokens=4, eos_id=None)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen.generate(prompts, max_new_tokens=9, eos_id=None)  # 1 prefill + 8 decode steps
    out.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))


@dataclass(frozen=True)
class Step:
    """A decode-step variant: the switches it sets before its generator captures a graph."""

    what: str
    fuse: bool = True  # model.fuse: compiled elementwise kernels
    dynamic_kv: bool = True  # Generator(dynamic_kv=...): attention over used slots, not key buckets
    hand_kernels: bool = True  # fused.HAND_KERNELS: rotary + cache writes in one Triton kernel
    skinny: bool = False  # linear.SKINNY: Triton products for few rows
    split_k: bool = True  # linear.SPLIT_K: row-parallel products as partial sums at few rows
    tma: bool = False  # linear.TMA: products streamed by the Triton TMA kernel at few rows
    tma_max_rows: int | None = None  # linear.TMA_MAX_ROWS; None: the module's own
    tma_widths: object = None  # linear.TMA_WIDTHS (anything with `in`); None: the module's own
    tma_roles: frozenset | None = None  # linear.TMA_ROLES; None: the module's own
    tma_eager: bool = False  # linear.TMA_EAGER: the TMA products in eager steps too
    tma_role_settings: tuple | None = None  # linear.TMA_ROLE_SETTINGS as (role, settings) pairs; None: the module's own
    splits_busy: int | None = None  # attention.MAX_SPLITS_BUSY; None: the module's own
    blas: str | None = None  # torch.backends.cuda.preferred_blas_library while capturing; None: torch's default
    prefill: bool = True  # fused.PREFILL: a prefill on the fused path too (compiled for any width)
    prefill_min_rows: int | None = None  # fused.PREFILL_MIN_ROWS; None: the module's own


class _AnyWidth:
    """Every model width (for linear.TMA_WIDTHS)."""

    def __contains__(self, width: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "any"


STEPS = {
    "plain": Step("unfused, SDPA over key buckets", fuse=False, dynamic_kv=False, hand_kernels=False),
    "fused-sdpa": Step("compiled elementwise kernels, SDPA over key buckets", dynamic_kv=False, hand_kernels=False),
    "fused-compiled": Step("compiled elementwise kernels, attention over used slots", hand_kernels=False),
    "fused-notma": Step("as fused-compiled, rotary + cache writes in one hand-written kernel; every product"
                        " on cuBLAS (the default before 2026-11-28 02:10)"),
    "fused": Step("as fused-notma, the products of up to linear.TMA_MAX_ROWS rows of a model of"
                  " linear.TMA_WIDTHS streamed by the TMA kernel; the default", tma=True),
    "fused-tma-eager": Step("as fused, the TMA products in eager steps too (before 2026-11-28 04:55);"
                            " differs from fused only without CUDA graphs: name it last with --compare-graph,"
                            " whose eager row is the last step's", tma=True, tma_eager=True),
    "fused-tma64": Step("as fused, the TMA products up to 64 rows", tma=True, tma_max_rows=64),
    "fused-tma-anywidth": Step("as fused, the TMA products at any model width", tma=True, tma_widths=_AnyWidth()),
    "fused-tma-w13w2": Step("as fused, only w1/w3 and w2 on the TMA kernel", tma=True,
                            tma_roles=frozenset({"w13", "w2"})),
    "fused-skinny": Step("as fused-notma, with Triton skinny products where faster than cuBLAS", skinny=True),
    "fused-split4": Step("as fused-notma, attention in up to four key chunks per head at large batch"
                         " (the default before 2026-11-27 09:20)", splits_busy=4),
    "fused-nosplit": Step("as fused-notma, row-parallel products through cuBLAS's own split-K at few rows"
                          " (the default before 2026-11-27 22:00)", split_k=False),
    "fused-lt": Step("as fused-notma, matrix products through cuBLASLt (torch's preferred BLAS library)",
                     blas="cublaslt"),
    "fused-plainprefill": Step("as fused, the prefill on the plain path at any size (eager elementwise"
                               " work; the prefill before 2026-11-27 23:46)", tma=True, prefill=False),
    "fused-allprefill": Step("as fused, the fused prefill at any size (also under PREFILL_MIN_ROWS)",
                             tma=True, prefill_min_rows=0),
}
_DEFAULT_SPLITS_BUSY = attention.MAX_SPLITS_BUSY
_DEFAULT_PREFILL_MIN_ROWS = fused.PREFILL_MIN_ROWS
_DEFAULT_TMA_MAX_ROWS = linear.TMA_MAX_ROWS
_DEFAULT_TMA_WIDTHS = linear.TMA_WIDTHS
_DEFAULT_TMA_ROLES = linear.TMA_ROLES
_DEFAULT_TMA_ROLE_SETTINGS = dict(linear.TMA_ROLE_SETTINGS)
_DEFAULT_BLAS = torch.backends.cuda.preferred_blas_library() if torch.cuda.is_available() else None


def _settings(text: str) -> tuple[int, int, int, int]:
    cfg = tuple(int(v) for v in text.split(","))
    if len(cfg) != 4:
        raise ValueError(text)
    return cfg


def _alt_step(p: argparse.ArgumentParser, text: str) -> Step:
    """The step fused-tma-alt: as fused, with the TMA launch settings given on the command
    line as linear.TMA_ROLE_SETTINGS: per product (ROLE=settings;...; the others keep the
    module's), or WIDE[/PARTIALS] for every product (q/k/v and w1/w3 whole, wo and w2 in
    slices; PARTIALS left out: the module's own)."""
    try:
        if "=" in text:
            pairs = tuple((role.strip(), _settings(cfg)) for role, cfg in
                          (item.split("=", 1) for item in text.split(";") if item.strip()))
            bad = [role for role, _ in pairs if role not in linear.TMA_ROLES]
            if bad:
                p.error(f"--tma-alt: unknown product(s) {bad}; valid: {sorted(linear.TMA_ROLES)}")
            return Step(f"as fused, TMA launch settings {dict(pairs)}", tma=True,
                        tma_role_settings=tuple(sorted({**_DEFAULT_TMA_ROLE_SETTINGS, **dict(pairs)}.items())))
        parts = [_settings(part) for part in text.split("/")]
        if len(parts) not in (1, 2):
            raise ValueError(text)
    except ValueError:
        p.error(f"--tma-alt {text!r}: want ROLE=BLOCK_N,BLOCK_K,warps,stages;... or "
                "BLOCK_N,BLOCK_K,warps,stages[/BLOCK_N,BLOCK_K,warps,stages]")
    wide, partials = parts[0], parts[1] if len(parts) == 2 else linear.TMA_PARTIALS
    roles = {**{role: wide for role in WHOLE}, **{role: partials for role in PARTIAL}}
    return Step(f"as fused, TMA launch settings {wide} / {partials} for every product", tma=True,
                tma_role_settings=tuple(sorted(roles.items())))


def _use_step(model, step: str) -> None:
    """Set the decode path; a generator's graph keeps the one set when it was captured."""
    v = STEPS[step]
    model.fuse, fused.HAND_KERNELS, linear.SKINNY, linear.SPLIT_K = v.fuse, v.hand_kernels, v.skinny, v.split_k
    linear.TMA, linear.TMA_EAGER = v.tma, v.tma_eager
    linear.TMA_MAX_ROWS = _DEFAULT_TMA_MAX_ROWS if v.tma_max_rows is None else v.tma_max_rows
    linear.TMA_WIDTHS = _DEFAULT_TMA_WIDTHS if v.tma_widths is None else v.tma_widths
    linear.TMA_ROLES = _DEFAULT_TMA_ROLES if v.tma_roles is None else v.tma_roles
    linear.TMA_ROLE_SETTINGS = _DEFAULT_TMA_ROLE_SETTINGS if v.tma_role_settings is None else dict(v.tma_role_settings)
    fused.PREFILL = v.prefill
    fused.PREFILL_MIN_ROWS = _DEFAULT_PREFILL_MIN_ROWS if v.prefill_min_rows is None else v.prefill_min_rows
    attention.MAX_SPLITS_BUSY = v.splits_busy or _DEFAULT_SPLITS_BUSY
    if _DEFAULT_BLAS is not None:
        torch.backends.cuda.preferred_blas_library(v.blas or _DEFAULT_BLAS)


def _warm_generator(model, step: str, b: int, seq_len: int, device: torch.device, args: argparse.Namespace,
                    prompts: list[list[int]], graph: bool) -> tuple[Generator, float]:
    _use_step(model, step)
    gen = Generator(model, max_batch_size=b, max_seq_len=seq_len, device=str(device), cuda_graph=graph,
                    kv_bucket=args.kv_bucket, dynamic_kv=STEPS[step].dynamic_kv)
    t = time.perf_counter()
    gen.generate(prompts, max_new_tokens=args.new_tokens, eos_id=None)  # warm-up, compile, graph capture
    return gen, time.perf_counter() - t


def _rounds(asked: int | None, per_round: int) -> int:
    """Rounds to run: as asked (with a note where the order's rotation cannot come out even),
    else the least multiple of the windows per round that is at least 3."""
    if asked is None:
        return per_round * -(-3 // per_round)
    if asked % per_round:
        print(f"note: {asked} rounds of {per_round} windows: some windows run in one position more often "
              f"than others (a multiple of {per_round} evens the rotation out)", flush=True)
    return asked


def _rotated(items: list, r: int) -> list:
    """``items`` started at position r (mod their count): round r's order of windows."""
    k = r % len(items)
    return items[k:] + items[:k]


def _median_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def bench_model(name: str, batch_sizes: list[int], args: argparse.Namespace, device: torch.device,
                card: Card, bw: float, kv_dtype: str) -> list[dict]:
    shape = PRESETS[name]
    seq_len = args.prompt_tokens + args.new_tokens
    t = time.perf_counter()
    model = build_model(shape, weights="random", dtype=args.dtype, device=str(device), seed=0,
                        max_batch_size=max(batch_sizes), max_seq_len=seq_len, kv_cache_dtype=kv_dtype)
    _sync(device)
    build_s = time.perf_counter() - t
    weight_bytes = model.weight_bytes(streamed_only=True)
    roofline_step_s = weight_bytes / bw
    g = torch.Generator().manual_seed(1)
    rows = []
    steps = args.steps.split(",")
    sampler_variants = [("off", None)]
    if args.compare_sampler and card.backend is not None:  # the sampler reads a real card
        sampler_variants.append(("on", args.sampler_hz))

    def row(b: int, graph: bool, step: str, sampler: str, warm_s: float, runs: list[dict]) -> None:
        best = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]  # median window
        rows.append({
            "model": name, "batch_size": b, "cuda_graph": graph, "step": step, "fused": STEPS[step].fuse,
            "kv_cache_dtype": kv_dtype,
            "sampler": sampler,
            "dtype": args.dtype, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "reps": args.reps, "kv_bucket": args.kv_bucket,
            "warmup_s": warm_s, "build_s": build_s, "weight_bytes": weight_bytes,
            "roofline_step_ms": 1e3 * roofline_step_s,
            "roofline_fraction_decode": roofline_step_s / (best["decode_step_ms"] / 1e3),
            "tokens_per_s_all_windows": [r["tokens_per_s"] for r in runs],
            # the card's power moves between windows at one speed: every window's energy, and its median
            "j_per_token_all_windows": [r["j_per_token"] for r in runs],
            "mean_w_all_windows": [r["mean_w"] for r in runs],
            "j_per_token_median": _median_or_none([r["j_per_token"] for r in runs]), **best})
        print(json.dumps({k: rows[-1][k] for k in ("model", "batch_size", "cuda_graph", "step", "sampler",
                                                    "warmup_s", "tokens_per_s", "decode_step_ms", "prefill_ms",
                                                    "roofline_fraction_decode", "j_per_token", "mean_w")}),
              flush=True)

    for b in batch_sizes:
        prompts = torch.randint(3, shape.vocab_size, (b, args.prompt_tokens), generator=g).tolist()
        if args.profile_dir and device.type == "cuda":
            for step in steps:
                _use_step(model, step)
                profile_step(model, prompts, seq_len, device, STEPS[step].dynamic_kv,
                             Path(args.profile_dir) / f"profile_{name}_{kv_dtype}_b{b}_{step}.txt")
        gens: dict[str, tuple[Generator, float]] = {}
        for step in steps:  # the decode path is fixed when a generator captures its graphs
            gen, warm_s = _warm_generator(model, step, b, seq_len, device, args, prompts, graph=True)
            gens[step] = (gen, warm_s)
        results: dict[tuple[str, str], list[dict]] = {(st, v): [] for st in steps for v, _ in sampler_variants}
        windows = [(st, sv) for st in steps for sv in sampler_variants]
        for r in range(_rounds(args.rounds, len(windows))):
            # interleave the variants so that drift hits all alike, and rotate their order from
            # round to round: on an H100 the third of three windows of one and the same step
            # drew 1.3-2.3% more power in each of five rounds
            for step, (v, hz) in _rotated(windows, r):
                _use_step(model, step)
                results[(step, v)].append(time_window(gens[step][0], prompts, args.new_tokens, args.reps,
                                                      card, device, hz))
        for (step, v), runs in results.items():
            row(b, True, step, v, gens[step][1], runs)
        del gens, gen
        if args.compare_graph:
            gen, warm_s = _warm_generator(model, steps[-1], b, seq_len, device, args, prompts, graph=False)
            row(b, False, steps[-1], "off", warm_s,
                [time_window(gen, prompts, args.new_tokens, args.reps, card, device, None)])
            del gen
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_report(out: str, card: Card, bw: float, rows: list[dict]) -> None:
    report = {"card": card.name, "power_limit_w": card.power_limit_w(), "copy_bandwidth_bytes_s": bw,
              "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "host": platform.node(), "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fused_status": fused.status(),
              "rows": rows}
    Path(out).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-7b", help=f"comma list of {sorted(PRESETS)}")
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=2, help="generate calls per timed window")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed windows per variant (median reported). The windows' order rotates from round "
                        "to round, so a multiple of the windows per round (steps x sampler off/on) puts each "
                        "in every position alike; default: the least such multiple of at least 3")
    p.add_argument("--sampler-hz", type=float, default=10.0)
    p.add_argument("--no-compare-graph", dest="compare_graph", action="store_false")
    p.add_argument("--no-compare-sampler", dest="compare_sampler", action="store_false")
    p.add_argument("--out", default="decode_bench.json")
    p.add_argument("--profile-dir", default=None, help="write a kernel table per batch size here")
    p.add_argument("--kv-bucket", type=int, default=32, help="attention reads keys in multiples of this")
    p.add_argument("--steps", default="fused",
                   help=f"comma list of decode-step variants, measured in the same run with windows "
                        f"interleaved: {', '.join(f'{k} ({v.what})' for k, v in STEPS.items())}, "
                        f"fused-tma-alt (as fused, with the launch settings of --tma-alt)")
    p.add_argument("--compare-fused", action="store_true", help="same as --steps plain,fused")
    p.add_argument("--kv-dtypes", default="auto",
                   help="comma list of KV-cache dtypes, a model built for each: auto (the model dtype), "
                        "float8_e4m3fn")
    p.add_argument("--tma-alt", default=None, metavar="SETTINGS",
                   help="the TMA kernel's launch settings (BLOCK_N,BLOCK_K,warps,stages) for the step "
                        "fused-tma-alt: per product, e.g. 'wqkv=64,128,4,4;w2=64,128,4,6', or for whole "
                        f"then partial products, e.g. 64,128,4,8/64,128,4,6 (now {linear.TMA_WIDE} / "
                        f"{linear.TMA_PARTIALS}, per product {linear.TMA_ROLE_SETTINGS}); "
                        "benchmarks/tma_pick.py reads them from gemv_bench.py --tma. A product whose K does not "
                        "cut into whole BLOCK_K blocks per slice keeps cuBLAS")
    args = p.parse_args(argv)
    if args.tma_alt:
        STEPS["fused-tma-alt"] = _alt_step(p, args.tma_alt)
    if args.compare_fused:
        args.steps = "plain,fused"
    if "fused-tma-alt" in args.steps.split(",") and not args.tma_alt:
        p.error("the step fused-tma-alt takes its launch settings from --tma-alt")
    unknown = [s for s in args.steps.split(",") if s not in STEPS]
    if unknown:
        p.error(f"unknown step variant(s) {unknown}; valid: {', '.join(STEPS)}")

    info = init_distributed(1)
    device = torch.device(info.device)
    card = Card.open(device)
    bw = copy_bandwidth_bytes_s(device)
    print(f"card {card.name}, copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows: list[dict] = []
    for name in args.models.split(","):
        for kv_dtype in args.kv_dtypes.split(","):
            rows += bench_model(name, [int(b) for b in args.batch_sizes.split(",")], args, device, card, bw,
                                kv_dtype)
            write_report(args.out, card, bw, rows)  # after each model: a cut-short run keeps what it measured
    print(f"fused: {fused.status()}")
    print(f"{'model':10} {'kv':>4} {'batch':>5} {'graph':>5} {'step':>10} {'smp':>3} {'tok/s':>8} {'step ms':>7} "
          f"{'pre ms':>7} {'roof':>5} {'J/tok':>7} {'J med':>7} {'W':>5}")
    for r in rows:
        jt = float("nan") if r["j_per_token"] is None else r["j_per_token"]
        w = float("nan") if r["mean_w"] is None else r["mean_w"]
        jm = float("nan") if r["j_per_token_median"] is None else r["j_per_token_median"]
        print(f"{r['model']:10} {r['kv_cache_dtype'][:4]:>4} {r['batch_size']:5d} {r['cuda_graph']!s:>5} {r['step']:>10} {r['sampler']:>3} "
              f"{r['tokens_per_s']:8.1f} {r['decode_step_ms']:7.3f} {r['prefill_ms']:7.2f} {r['roofline_fraction_decode']:5.1%} "
              f"{jt:7.4f} {jm:7.4f} {w:5.0f}")
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
