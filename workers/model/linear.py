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
DEFAULT = {16: (32, 256, 4, 4), 32: (32, 256, 4, 4), 64: (32, 256, 4, 3)}
CONFIGS = [(16, 512, 4, 4), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4), (64, 256, 8, 3)]


MAX_ROWS = 16  # the decode path uses the kernel up to this many rows (measured, docs/performance.md)


def _rows_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def settings() -> dict:
    return {"default": {str(k): v for k, v in DEFAULT.items()}, "configs": CONFIGS}


if triton is not None:
    @triton.jit
    def _skinny_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GATED: tl.constexpr):
        pid_n = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x_mask = (offs_m[:, None] < M) & (kk[None, :] < K)
            x_at = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
            x = tl.load(x_at, mask=x_mask, other=0.0)
            if GATED:  # x holds [gate | up]: the input is silu(gate) * up, rounded as eager rounds it
                gate = x.to(tl.float32)
                up = tl.load(x_at + K, mask=x_mask, other=0.0)
                x = ((gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up).to(up.dtype)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + kk[None, :],
                        mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _launch(x2: torch.Tensor, w: torch.Tensor, k: int, gated: bool,
            config: tuple[int, int, int, int] | None) -> torch.Tensor:
    m, n = x2.shape[0], w.shape[0]
    block_m = _rows_block(m)
    block_n, block_k, warps, stages = config or DEFAULT[block_m]
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_kernel[grid](x2, w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GATED=gated,
                         num_warps=warps, num_stages=stages)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def skinny_linear(x: torch.Tensor, w: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` for x (..., K) of few rows and w (N, K), contiguous in K."""
    if triton is None:
        raise RuntimeError("skinny_linear needs Triton (a CUDA build of PyTorch)")
    k = x.shape[-1]
    return _launch(_rows(x), w, k, False, config).view(*x.shape[:-1], w.shape[0])


def gated_linear(gate_up: torch.Tensor, w: torch.Tensor,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``F.linear(silu(gate) * up, w)`` where ``gate_up`` is (..., 2K) = [gate | up]: the
    feed-forward's down projection with SiLU x up done as the input is loaded, so no
    kernel writes the product out and reads it back."""
    if triton is None:
        raise RuntimeError("gated_linear needs Triton (a CUDA build of PyTorch)")
    k = gate_up.shape[-1] // 2
    return _launch(_rows(gate_up), w, k, True, config).view(*gate_up.shape[:-1], w.shape[0])


def usable(x: torch.Tensor, max_rows: int = 16) -> bool:
    """Whether the skinny kernel serves this input: Triton present, on CUDA, 16-bit (in
    float32 ``tl.dot`` would round through TF32, where cuBLAS does not), few rows."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() // x.shape[-1] <= max_rows)
