"""The decode step's TMA product (``workers.model.linear.tma_linear``) as a persistent
kernel: a fixed number of programs walk the output bands in turn and the other SMs stay
idle. A bench-only form for one question (``gemv_bench.py --tma --programs``): does
streaming a weight on fewer SMs cost fewer joules per byte? On an H100 it did not
(``docs/performance.md``): fewer programs ran slower and spent more.
"""
from __future__ import annotations

import torch

from workers.model import linear

if linear.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _persistent(w_desc, x_ptr, y_ptr, M, N, K_SLICE, stride_xm, stride_ys, stride_ym, BANDS, TILES,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
        for t in range(tl.program_id(0), TILES, tl.num_programs(0)):
            linear.tma_tile(w_desc, x_ptr, y_ptr, M, N, K_SLICE, stride_xm, stride_ys, stride_ym,
                            t % BANDS, t // BANDS, BLOCK_N, BLOCK_K, BLOCK_M)


def persistent_linear(x: torch.Tensor, w: torch.Tensor, slices: int, config: tuple[int, int, int, int],
                      programs: int) -> torch.Tensor:
    """As ``linear.tma_linear(x, w, slices, config)``, on ``programs`` programs."""
    args, bands, y, meta = linear.tma_prepare(x, w, slices, config)
    _persistent[(min(programs, bands * slices),)](*args, bands, bands * slices, **meta)
    shape = (*x.shape[:-1], w.shape[0])
    return y.view(shape) if slices == 1 else y.view(slices, *shape)
