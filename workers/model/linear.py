"""Skinny matrix products (few rows of activations against a large weight) in Triton.

A decode step multiplies a handful of activation rows by each weight matrix; the
time is the time to stream the weight from memory once. Two kernels here:

- ``tma_linear`` (on by default for models 4,096 wide at up to four rows, on one GPU, in a
  step captured as a CUDA graph):
  each program streams a 64-row band of the weight through the tensor-memory copy
  engine (TMA) in a deep pipeline and multiplies it by the activation rows on tensor
  cores, weight on the wide side of the product (y^T = W x^T). It can cut K
  into slices and return partial products, as ``partial_products`` does. Faster than
  cuBLAS on LLaMA-7B's products at few rows; its step cheaper in joules per token on
  H100s and no dearer, within the cards' own swings, on H200s. Not cheaper at more rows
  or at LLaMA-13B's shapes, which stay on cuBLAS (settings below, measurements in
  ``docs/performance.md``).
- ``skinny_linear`` (off, ``SKINNY``): per-thread loads, a band of output features per
  program. Faster than cuBLAS on some products but it drew 10-20% more power for the same
  bytes. Tried and dropped: SiLU x up applied while loading the down projection's input
  (3-8 times slower: every program redoes the whole activation) and one row on plain
  multiply-adds instead of a padded tensor-core tile (slower and no cheaper).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the callers keep F.linear
    triton = None
try:  # host-side tensor-memory (TMA) descriptors: Triton 3.3 and later
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

# launch settings (BLOCK_N, BLOCK_K, num_warps, num_stages); the bench sweeps CONFIGS
CONFIGS = [(16, 512, 4, 4), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4), (64, 256, 8, 3)]
MAX_ROWS = 16  # any product at up to this many rows ...
MAX_ROWS_NARROW = 64  # ... and narrow ones (output <= NARROW_N features) up to this many
NARROW_N = 8192
# Off by default: faster than cuBLAS but not cheaper in energy. On an H200 the kernel
# drew 10-20% more power than cuBLAS streaming the same weight, so a decode step
# with it ran 5% faster at 5-10% more joules per token (docs/performance.md).
SKINNY = False

# Row-parallel products (wo, w2) of a one-GPU model at up to this many activation rows run as
# SPLIT_K_SLICES partial products in one batched call (``partial_products``) whose
# sum the next fused add + RMSNorm takes (fused.add_norm). cuBLAS splits the
# reduction of these narrow products itself at few rows and adds the partials in
# a kernel of its own. On an H100, LLaMA-7B's wo + w2 with their norms took 4-6 us
# less per layer at every row count from 1 to 64 (benchmarks/splitk_bench.py).
SPLIT_K = True
SPLIT_K_SLICES = 2
SPLIT_K_MAX_ROWS = 64

# A one-GPU decode step of up to TMA_MAX_ROWS rows, in a model whose width (hidden size) is
# one of TMA_WIDTHS, streams the weights of the products named in TMA_ROLES through the
# tensor-memory copy engine (``tma_linear``): q/k/v and w1/w3 whole, wo and w2 as
# SPLIT_K_SLICES partials. On three H100s, LLaMA-7B's step at batch 1 ran 4-6% faster for
# 3-4% fewer joules per token (on one of them also at batch 2 and 4: 6% faster, 2-6% fewer).
# At batch 8 it ran 5% faster for -1% to +1% energy, at batch 64 1% faster for 3-5% more,
# and LLaMA-13B's batch 1 4% faster for 1-2% more, so those stay on cuBLAS: only what was
# measured cheaper takes it (docs/performance.md).
# (BLOCK_N, BLOCK_K, num_warps, num_stages): TMA_ROLE_SETTINGS per product where one is
# set, else TMA_WIDE whole and TMA_PARTIALS in slices. The best of ``benchmarks/gemv_bench.py
# --tma`` at one row (``benchmarks/tma_pick.py``) on an H100 and an H200: both cards picked a
# four-stage pipeline for q/k/v, six for w1/w3, and six (H200) or four and six alike (H100)
# for the partials. On the H200 the whole step ran 2% faster with these than with six stages
# for q/k/v and four for the partials; on the H100 it ran the same (docs/performance.md).
TMA = True
TMA_MAX_ROWS = 4
TMA_WIDTHS = frozenset({4096})
TMA_ROLES = frozenset({"wqkv", "wo", "w13", "w2"})
TMA_WIDE = (64, 128, 4, 6)
TMA_PARTIALS = (64, 128, 4, 6)
TMA_ROLE_SETTINGS: dict[str, tuple[int, int, int, int]] = {"wqkv": (64, 128, 4, 4)}
# Only inside a CUDA graph's capture (and the warm-up before it, ``as_in_graph``): an eager
# step pays each launch on the host, and the kernel's (a Triton launch and a descriptor per
# call) cost more than cuBLAS's. On one H100, LLaMA-7B at batch 1 without graphs: 31.5 ms a
# step and 5.69 J/token with the kernel, 28.8 ms and 5.43 without.
TMA_EAGER = False
_AS_IN_GRAPH = False  # set by as_in_graph()
TMA_TILE_ROWS = 64  # the kernel's activation tile holds at most this many rows


def _rows_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def default_config(block_m: int, n: int) -> tuple[int, int, int, int]:
    """Best of CONFIGS on an H200 for LLaMA-7B's shapes (``benchmarks/gemv_bench.py``):
    wide bands for wide outputs at few rows, narrow deep-pipelined ones otherwise."""
    if block_m == 16:
        return (64, 128, 4, 4) if n > NARROW_N else (32, 256, 4, 4)
    return (32, 128, 4, 6)


def settings() -> dict:
    return {"configs": CONFIGS, "max_rows": MAX_ROWS, "max_rows_narrow": MAX_ROWS_NARROW, "narrow_n": NARROW_N,
            "skinny": SKINNY, "split_k": SPLIT_K, "split_k_slices": SPLIT_K_SLICES,
            "split_k_max_rows": SPLIT_K_MAX_ROWS, "tma": TMA, "tma_max_rows": TMA_MAX_ROWS,
            "tma_widths": sorted(TMA_WIDTHS), "tma_roles": sorted(TMA_ROLES),
            "tma_wide": TMA_WIDE, "tma_partials": TMA_PARTIALS, "tma_role_settings": dict(TMA_ROLE_SETTINGS),
            "tma_eager": TMA_EAGER}


def split_k_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (..., K) times w (N, K) takes ``partial_products``: switched on, on
    CUDA (where it was measured), few rows, and K cut evenly into the slices."""
    k = x.shape[-1]
    return (SPLIT_K and x.is_cuda and x.numel() // k <= SPLIT_K_MAX_ROWS and k % SPLIT_K_SLICES == 0
            and w.is_contiguous())


def partial_products(x: torch.Tensor, w: torch.Tensor, slices: int | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` as ``slices`` partial products over equal cuts of K, stacked
    first: (slices, ..., N), summing to the product. One batched call over views of x
    and w (no copies)."""
    s = slices or SPLIT_K_SLICES
    k, n = x.shape[-1], w.shape[0]
    rows = x.reshape(-1, k)
    xs = rows.view(rows.shape[0], s, k // s).transpose(0, 1)  # (s, m, K/s)
    ws = w.view(n, s, k // s).permute(1, 2, 0)  # (s, K/s, N): slice j of every weight row
    return torch.bmm(xs, ws).view(s, *x.shape[:-1], n)


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


if triton is not None:
    @triton.jit
    def tma_tile(w_desc, x_ptr, y_ptr, M, N, K_SLICE, stride_xm, stride_ys, stride_ym, band, piece,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
        """Output band ``band`` of K slice ``piece``. The weight tile is the product's wide
        operand and the few activation rows its narrow one (y^T = W x^T), so a 64-row
        weight band fills the tensor cores' wide side."""
        k_begin = piece * K_SLICE
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K_SLICE, BLOCK_K):
            w = w_desc.load([band * BLOCK_N, k_begin + k0])
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k_begin + k0 + offs_k)[:, None],
                         mask=offs_m[None, :] < M, other=0.0)
            acc = tl.dot(w, xt, acc)
        offs_n = band * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(y_ptr + piece * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None],
                 acc.to(y_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))

    @triton.jit
    def _tma_kernel(w_desc, x_ptr, y_ptr, M, N, K_SLICE, stride_xm, stride_ys, stride_ym,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):
        tma_tile(w_desc, x_ptr, y_ptr, M, N, K_SLICE, stride_xm, stride_ys, stride_ym,
                 tl.program_id(0), tl.program_id(1), BLOCK_N, BLOCK_K, BLOCK_M)


def tma_config(slices: int, role: str | None = None) -> tuple[int, int, int, int]:
    """The launch settings ``tma_linear`` uses by default: the product ``role``'s own
    (TMA_ROLE_SETTINGS), else those for this many slices."""
    if role in TMA_ROLE_SETTINGS:
        return TMA_ROLE_SETTINGS[role]
    return TMA_WIDE if slices == 1 else TMA_PARTIALS


def tma_shapes_fit(rows: int, k: int, slices: int, block_k: int, max_rows: int = TMA_TILE_ROWS) -> bool:
    """The kernel's shape rules: at most ``max_rows`` rows (and no more than its tile holds),
    and K cut into ``slices`` equal slices of whole BLOCK_K blocks (the loop over a slice has
    no mask: a partial block would read into the next slice and past the activations)."""
    return (rows <= min(max_rows, TMA_TILE_ROWS) and slices >= 1 and k % slices == 0
            and (k // slices) % block_k == 0)


def tma_platform(x: torch.Tensor) -> bool:
    """Triton with host TMA descriptors, an NVIDIA card of compute capability 9 or later,
    and 16-bit activations: where the kernel runs at all."""
    return (triton is not None and TensorDescriptor is not None and x.is_cuda and torch.version.hip is None
            and torch.cuda.get_device_capability(x.device)[0] >= 9 and x.dtype in (torch.bfloat16, torch.float16))


def tma_usable(x: torch.Tensor, w: torch.Tensor, slices: int = 1, block_k: int | None = None,
               max_rows: int = TMA_TILE_ROWS, role: str | None = None) -> bool:
    """Whether ``tma_linear`` can run here: the platform (``tma_platform``), a weight of the
    activations' dtype that TMA can address (contiguous, 16-byte aligned base and rows), and
    the shape rules (``tma_shapes_fit``, with the BLOCK_K of ``tma_config(slices, role)``
    unless given)."""
    k = x.shape[-1]
    block_k = tma_config(slices, role)[1] if block_k is None else block_k
    return (tma_platform(x) and w.dtype == x.dtype and w.is_contiguous() and w.data_ptr() % 16 == 0
            and (w.shape[-1] * w.element_size()) % 16 == 0
            and tma_shapes_fit(x.numel() // k, k, slices, block_k, max_rows))


def tma_serves(x: torch.Tensor, w: torch.Tensor, role: str, width: int, slices: int = 1) -> bool:
    """Whether a one-GPU decode step's product ``role`` (wqkv, wo, w13, w2) takes the TMA
    kernel: switched on (``TMA``), a role in TMA_ROLES, a model ``width`` (its hidden size) in
    TMA_WIDTHS, at up to TMA_MAX_ROWS rows, usable, and a step being captured as a CUDA graph
    (unless ``TMA_EAGER``)."""
    return (TMA and role in TMA_ROLES and width in TMA_WIDTHS
            and (TMA_EAGER or _AS_IN_GRAPH or _capturing(x))
            and tma_usable(x, w, slices, max_rows=TMA_MAX_ROWS, role=role))


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@contextmanager
def as_in_graph() -> Iterator[None]:
    """Eager steps inside take the products a captured step takes: the warm-up steps before
    a capture (so that the kernel compiles and loads outside it) and kernel profiles."""
    global _AS_IN_GRAPH
    before, _AS_IN_GRAPH = _AS_IN_GRAPH, True
    try:
        yield
    finally:
        _AS_IN_GRAPH = before


def tma_prepare(x: torch.Tensor, w: torch.Tensor, slices: int, config: tuple[int, int, int, int]):
    """The launch of ``tma_linear`` without running it: (kernel args, grid, output, settings).
    Refuses shapes the kernel would get wrong rather than return garbage."""
    block_n, block_k, warps, stages = config
    x2 = _rows(x)
    m, k = x2.shape
    n = w.shape[0]
    if w.shape[-1] != k or not tma_shapes_fit(m, k, slices, block_k):
        raise ValueError(f"tma_linear: {m} rows of K={k} against a weight {tuple(w.shape)} in {slices} "
                         f"slice(s) of BLOCK_K={block_k}: needs <= {TMA_TILE_ROWS} rows and K/slices a "
                         f"multiple of BLOCK_K (check tma_usable first)")
    y = torch.empty((slices, m, n), device=x.device, dtype=x.dtype)
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
    args = (desc, x2, y, m, n, k // slices, x2.stride(0), y.stride(0), y.stride(1))
    meta = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=_rows_block(m), num_warps=warps, num_stages=stages)
    return args, triton.cdiv(n, block_n), y, meta


def tma_linear(x: torch.Tensor, w: torch.Tensor, slices: int = 1,
               config: tuple[int, int, int, int] | None = None, role: str | None = None) -> torch.Tensor:
    """``F.linear(x, w)`` for x (..., K) of few rows, the weight streamed by TMA rather
    than per-thread loads. With ``slices`` > 1 the result is that many partial products
    over equal cuts of K, stacked first, as ``partial_products`` gives them. Launch settings:
    ``config``, else ``tma_config(slices, role)``."""
    args, bands, y, meta = tma_prepare(x, w, slices, config or tma_config(slices, role))
    _tma_kernel[(bands, slices)](*args, **meta)
    shape = (*x.shape[:-1], w.shape[0])
    return y.view(shape) if slices == 1 else y.view(slices, *shape)


def _launch(x2: torch.Tensor, w: torch.Tensor, k: int, config: tuple[int, int, int, int] | None) -> torch.Tensor:
    m, n = x2.shape[0], w.shape[0]
    block_m = _rows_block(m)
    block_n, block_k, warps, stages = config or default_config(block_m, n)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_kernel[grid](x2, w, y, m, n, k, x2.stride(0), w.stride(0), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
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
    return _launch(_rows(x), w, k, config).view(*x.shape[:-1], w.shape[0])


def usable(x: torch.Tensor, n: int) -> bool:
    """Whether the skinny kernel is the faster choice for x (..., K) times an (n, K)
    weight: Triton present, on CUDA, 16-bit (in float32 ``tl.dot`` would round through
    TF32, where cuBLAS does not), and few rows (up to 64 for narrow outputs, where
    cuBLAS splits the reduction over two kernels; up to 16 for wide ones)."""
    if triton is None or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    rows = x.numel() // x.shape[-1]
    return rows <= MAX_ROWS or (rows <= MAX_ROWS_NARROW and n <= NARROW_N)
