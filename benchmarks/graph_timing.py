"""GPU time of calls replayed from a CUDA graph, as the generator runs its decode step:
no host work between kernels, so launch overhead is not counted."""
from __future__ import annotations

import statistics

import torch


def capture(fns: list) -> torch.cuda.CUDAGraph:
    """A graph of ``fns`` called once each, in order, after a warm-up of the first
    three on a side stream (compiles and allocations stay out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return graph


def graph_time_us(fns: list, reps: int = 15) -> float:
    """GPU time per call of ``fns`` (captured once each in one graph); median of reps replays."""
    graph = capture(fns)
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(times)
