"""Skinny matrix products (few rows of activations against a large weight) in Triton.

A decode step multiplies a handful of activation rows by each weight matrix; the
time is the time to stream the weight from memory once. This kernel gives each
program a narrow band of output features and walks the whole reduction
dimension, so there are many programs (enough to keep every SM's loads in
flight) and each weight byte is read exactly once. The product itself runs on
tensor cores (``tl.dot`` on a 16-row tile, rows beyond the batch masked off).

Used only where it is measured to beat cuBLAS (``benchmarks/gemv_bench.py``).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the callers keep F.linear
    triton = None

# (BLOCK_N, BLOCK_K, num_warps, num_stages) by batch rows; the bench sweeps CONFIGS
DEFAULT = {16: (16, 512, 4, 4), 32: (32, 256, 4, 4), 64: (32, 256, 4, 4)}
CONFIGS = [(16, 512, 4, 4), (16, 256, 4, 6), (32, 256, 4, 4), (32, 512, 8, 3), (64, 256, 8, 3)]


def _rows_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def settings() -> dict:
    return {"default": {str(k): v for k, v in DEFAULT.items()}, "configs": CONFIGS}


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                        mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                        mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` for x (..., K) of few rows and w (N, K), both contiguous in K."""
    if triton is None:
        raise RuntimeError("skinny_linear needs Triton (a CUDA build of PyTorch)")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], w.shape[0]
    block_m = _rows_block(m)
    block_n, block_k, warps, stages = config or DEFAULT[block_m]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_kernel[grid](x2, w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], n)
