"""The elementwise parts of one decode step, fused into a few kernels.

Between its matrix products a decode step runs many small kernels per layer
(RMSNorm, residual add, rotary, two cache writes, SiLU, multiply). At batch 1
each costs a few microseconds of launch and tail, well over the bytes it moves.
Here they are written as three plain functions that Inductor compiles into one
kernel each (default mode: no CUDA graphs of its own, since the generator
captures the whole step):

- ``add_rms_norm``: residual add and the next RMSNorm (``h = x + d; n = norm(h)``);
  the transformer carries the pending add across layers, so each layer runs two
  of these and no separate add;
- ``rope_cache``: rotary on q and k (real arithmetic in float32, Meta's
  interleaved pairs) and both cache writes, returning q in attention layout;
- ``silu_mul``: SiLU of the gate times the up projection.

The same functions run uncompiled where Inductor is not available (or on the
CPU unless asked for): the result is the same computation, only not fused.

Inductor splits ``rope_cache`` into three kernels (one per output it writes);
``rope_cache_triton`` is the same work written by hand as one kernel, one
program per (row, head), used for decode steps on CUDA (``rope_cache_fast``).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the compiled (or eager) rope_cache serves
    triton = None


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + delta
    return h, F.rms_norm(h, weight.shape, weight, eps)


def add_partials_rms_norm(x: torch.Tensor, partials: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As add_rms_norm, with the delta given as partial sums (S, *x.shape), each
    already rounded to the activations' dtype by its product, added in float32."""
    # unrolled over the few partials: a sum over dim 0 made Inductor write a
    # reduction kernel that ran 2 us slower at 8 rows than the plain add's
    total = partials[0].float()
    for j in range(1, partials.shape[0]):
        total = total + partials[j].float()
    h = x + total.to(x.dtype)
    return h, F.rms_norm(h, weight.shape, weight, eps)


def rope_cache(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
               slots: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """qkv: (B, T, nq + 2 nkv, D); cos_sin: (B, T, 1, D/2, 2) float32; caches: (B, nkv, S, D),
    the rows of this batch. Writes the rotated keys and the values at ``slots`` of both
    caches; returns rotated q as (B, nq, T, D)."""
    x = qkv[:, :, : nq + nkv].float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos_sin[..., 0], cos_sin[..., 1]
    rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(qkv.dtype)
    # an indexed assignment into the whole input (not into a slice of it) is what
    # Inductor writes in place; a slice or index_copy_ here would copy the cache
    cache_k[:, :, slots] = rot[:, :, nq:].transpose(1, 2).to(cache_k.dtype)
    cache_v[:, :, slots] = qkv[:, :, nq + nkv:].transpose(1, 2).to(cache_v.dtype)
    return rot[:, :, :nq].transpose(1, 2).contiguous()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + delta`` and its RMSNorm, compiled; ``delta`` may be a row-parallel
    product's partial sums (one leading dimension more than x, linear.partial_products)."""
    if delta.dim() > x.dim():
        return ADD_PARTIALS_RMS_NORM(x, delta, weight, eps)
    return ADD_RMS_NORM(x, delta, weight, eps)


class _Compiled:
    """``fn`` compiled on first use; on any compile error, a warning and ``fn`` as it is.

    ``rows=True``: its arguments are (rows, features) and the row count is compiled as
    a symbol, so that one kernel serves every batch and prompt width. A prefill sees a
    new width with almost every batch; compiled for each, the compile would land inside
    the measured window. The callers flatten (batch, tokens) into rows: a batch of one
    would otherwise be a dimension of size 1, which is always compiled apart. Decode
    steps keep their own instances, compiled for the one shape their CUDA graph replays."""

    def __init__(self, fn: Callable, rows: bool = False) -> None:
        self.fn, self.rows = fn, rows
        self.name = fn.__name__
        self._compiled: Callable | None = None
        self.error: str | None = None
        self.over_limit = False  # a shape met the recompile limit (and ran unfused)

    def __call__(self, *args):
        if self.error is None and COMPILE:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, fullgraph=True, dynamic=None)
            if self.rows:
                for a in args:
                    if isinstance(a, torch.Tensor) and a.dim() == 2:
                        torch._dynamo.maybe_mark_dynamic(a, 0)
            try:
                return self._compiled(*args)
            except Exception as err:  # no Triton, an unsupported op...: stay correct, unfused
                if type(err).__name__ == "FailOnRecompileLimitHit":
                    # one shape too many for this function's compile cache (many model shapes in
                    # one process): this call runs unfused, the shapes compiled before keep theirs
                    if not self.over_limit:
                        warnings.warn(f"{self.name}: torch.compile's recompile limit reached; new shapes "
                                      "run unfused", RuntimeWarning)
                    self.over_limit = True
                    return self.fn(*args)
                self.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                warnings.warn(f"torch.compile of {self.name} failed ({self.error}); running it unfused",
                              RuntimeWarning)
        return self.fn(*args)


COMPILE = True  # False: the fused path's functions run eagerly (same result, more kernels)
ADD_RMS_NORM = _Compiled(add_rms_norm)
ADD_PARTIALS_RMS_NORM = _Compiled(add_partials_rms_norm)
ROPE_CACHE = _Compiled(rope_cache)
SILU_MUL = _Compiled(silu_mul)


# The prefill's (rows = batch x tokens, any count). Functions of their own: compiled code
# is cached per function, and decode's shapes and the prefill's would share one cache and
# its recompile limit.
def add_rms_norm_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return add_rms_norm(x, delta, weight, eps)


def silu_mul_rows(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_mul(gate_up)


ADD_RMS_NORM_ROWS = _Compiled(add_rms_norm_rows, rows=True)
SILU_MUL_ROWS = _Compiled(silu_mul_rows, rows=True)
# Rows (batch x tokens) from which a prefill takes the fused path. The compiled and
# Triton calls cost more host time per call than the few eager kernels they replace,
# and a small prefill is bound by that host time (docs/performance.md).
PREFILL_MIN_ROWS = 1024


def add_norm_rows(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_norm`` for a prefill: (B, T, D) as rows, one compiled kernel for every B and T."""
    h, normed = ADD_RMS_NORM_ROWS(x.reshape(-1, x.shape[-1]), delta.reshape(-1, x.shape[-1]), weight, eps)
    return h.view(x.shape), normed.view(x.shape)


def silu_mul_rows_of(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) x up of a prefill: (B, T, 2H) as rows, one compiled kernel for every B and T."""
    out = SILU_MUL_ROWS(gate_up.reshape(-1, gate_up.shape[-1]))
    return out.view(*gate_up.shape[:-1], out.shape[-1])


def status() -> dict[str, object]:
    """Whether each function runs compiled, for benchmark records."""
    fns = (ADD_RMS_NORM, ADD_PARTIALS_RMS_NORM, ROPE_CACHE, SILU_MUL, ADD_RMS_NORM_ROWS, SILU_MUL_ROWS)
    return {"compile": COMPILE, "compiled": [f.name for f in fns if f._compiled is not None and f.error is None],
            "errors": {f.name: f.error for f in fns if f.error}}


if triton is not None:
    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cs_ptr, ck_ptr, cv_ptr, slots_ptr, q_ptr,
                           stride_qkv_b, stride_cs_b, stride_c_b, stride_c_h, stride_c_s, stride_q_b,
                           NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a cache may pass 2**31 elements
        h = tl.program_id(1)  # query heads, then key heads
        i = tl.arange(0, HALF)
        src = qkv_ptr + b * stride_qkv_b + h * (2 * HALF)
        x0 = tl.load(src + 2 * i).to(tl.float32)
        x1 = tl.load(src + 2 * i + 1).to(tl.float32)
        c = tl.load(cs_ptr + b * stride_cs_b + 2 * i)
        s = tl.load(cs_ptr + b * stride_cs_b + 2 * i + 1)
        # rounded to the activations' dtype first, as the compiled function does
        r0 = (x0 * c - x1 * s).to(qkv_ptr.dtype.element_ty)
        r1 = (x0 * s + x1 * c).to(qkv_ptr.dtype.element_ty)
        if h < NQ:
            dst = q_ptr + b * stride_q_b + h * (2 * HALF)
            tl.store(dst + 2 * i, r0)
            tl.store(dst + 2 * i + 1, r1)
        else:
            kv = h - NQ
            at = b * stride_c_b + kv * stride_c_h + tl.load(slots_ptr) * stride_c_s
            tl.store(ck_ptr + at + 2 * i, r0.to(ck_ptr.dtype.element_ty))
            tl.store(ck_ptr + at + 2 * i + 1, r1.to(ck_ptr.dtype.element_ty))
            d = tl.arange(0, 2 * HALF)
            v = tl.load(qkv_ptr + b * stride_qkv_b + (NQ + NKV + kv) * (2 * HALF) + d)
            tl.store(cv_ptr + at + d, v.to(cv_ptr.dtype.element_ty))


def rope_cache_triton(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      slots: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """``rope_cache`` for one token a row (T = 1) in one kernel; same arguments and result."""
    b, _, _, d = qkv.shape
    q = torch.empty((b, nq, 1, d), device=qkv.device, dtype=qkv.dtype)
    _rope_cache_kernel[(b, nq + nkv)](
        qkv, cos_sin, cache_k, cache_v, slots, q,
        qkv.stride(0), cos_sin.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), q.stride(0),
        NQ=nq, NKV=nkv, HALF=d // 2, num_warps=1)
    return q


def hand_kernels_serve(head_dim: int, device: torch.device) -> bool:
    """Whether the hand-written rotary + cache kernels run for this head size on this
    device: Triton, CUDA, a power-of-two head size, ``HAND_KERNELS`` on."""
    half = head_dim // 2
    return (triton is not None and HAND_KERNELS and device.type == "cuda"
            and half >= 1 and half & (half - 1) == 0)


def _triton_rope_serves(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor,
                        cache_v: torch.Tensor) -> bool:
    """The hand-written kernels run, and the tensors lie as they index them."""
    return (hand_kernels_serve(qkv.shape[-1], qkv.device)
            and qkv.stride(-1) == 1 and qkv.stride(-2) == qkv.shape[-1]
            and cos_sin.stride(-1) == 1 and cos_sin.stride(-2) == 2
            and cache_k.stride(-1) == 1 and cache_v.stride() == cache_k.stride())


def rope_cache_fast(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                    slots: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """The hand-written kernel where it serves (CUDA, one token a row, head size a power
    of two), else the compiled function."""
    if qkv.shape[1] == 1 and _triton_rope_serves(qkv, cos_sin, cache_k, cache_v):
        return rope_cache_triton(qkv, cos_sin, cache_k, cache_v, slots, nq, nkv)
    return ROPE_CACHE(qkv, cos_sin, cache_k, cache_v, slots, nq, nkv)


HAND_KERNELS = True  # False: rotary and cache writes take the compiled function (for comparison)
PREFILL = True  # False: a prefill takes the plain path where decode steps are fused (for comparison)


def prefill_serves(head_dim: int, device: torch.device) -> bool:
    """Whether a prefill may take the fused path: the rows kernel runs there. Where it does
    not, the whole prefill stays on the plain path: rotary and the cache writes uncompiled
    would cost more than there."""
    return PREFILL and hand_kernels_serve(head_dim, device)

# heads per program of the prefill's kernel: a program per (row, head) as in decode
# would be 8,192 x 96 programs of 256 bytes each at batch 64 x 128 tokens
ROWS_HEADS_PER_PROGRAM = 8

if triton is not None:
    # T left unspecialised: Triton would compile again for widths that are (not) multiples of 16
    @triton.jit(do_not_specialize=["T"])
    def _rope_cache_rows_kernel(qkv_ptr, cs_ptr, ck_ptr, cv_ptr, slots_ptr, q_ptr, T,
                                stride_qkv_b, stride_qkv_t, stride_cs_b, stride_cs_t,
                                stride_c_b, stride_c_h, stride_c_s, stride_q_b, stride_q_h, stride_q_t,
                                NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr, HB: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # b * T + t; 64-bit offsets, as in decode
        b = row // T
        t = row % T
        h = tl.program_id(1) * HB + tl.arange(0, HB)[:, None]  # query heads, then key heads
        d = tl.arange(0, 2 * HALF)[None, :]
        live = h < NQ + NKV
        # whole head rows are loaded and stored (wide, contiguous accesses); the pairs
        # are split and joined in registers: loads of every other element ran at a
        # third of the memory's speed
        src = qkv_ptr + b * stride_qkv_b + t * stride_qkv_t
        x = tl.load(src + h * (2 * HALF) + d, mask=live, other=0.0).to(tl.float32)
        x0, x1 = tl.split(tl.reshape(x, (HB, HALF, 2)))
        cs = tl.load(cs_ptr + b * stride_cs_b + t * stride_cs_t + tl.arange(0, 2 * HALF))
        c, s = tl.split(tl.reshape(cs, (HALF, 2)))
        c = c[None, :]
        s = s[None, :]
        # rounded to the activations' dtype first, as the compiled function does
        r0 = (x0 * c - x1 * s).to(qkv_ptr.dtype.element_ty)
        r1 = (x0 * s + x1 * c).to(qkv_ptr.dtype.element_ty)
        r = tl.reshape(tl.join(r0, r1), (HB, 2 * HALF))
        tl.store(q_ptr + b * stride_q_b + h * stride_q_h + t * stride_q_t + d, r, mask=h < NQ)
        is_k = live & (h >= NQ)
        kv = h - NQ  # negative on query heads, which the masks leave out
        at = b * stride_c_b + kv * stride_c_h + tl.load(slots_ptr + t) * stride_c_s
        tl.store(ck_ptr + at + d, r.to(ck_ptr.dtype.element_ty), mask=is_k)
        v = tl.load(src + (NQ + NKV + kv) * (2 * HALF) + d, mask=is_k, other=0.0)
        tl.store(cv_ptr + at + d, v.to(cv_ptr.dtype.element_ty), mask=is_k)


def rope_cache_rows_triton(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                           slots: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """``rope_cache`` for any number of tokens a row in one kernel; same arguments and result."""
    b, t, _, d = qkv.shape
    q = torch.empty((b, nq, t, d), device=qkv.device, dtype=qkv.dtype)
    hb = ROWS_HEADS_PER_PROGRAM
    _rope_cache_rows_kernel[(b * t, triton.cdiv(nq + nkv, hb))](
        qkv, cos_sin, cache_k, cache_v, slots, q, t,
        qkv.stride(0), qkv.stride(1), cos_sin.stride(0), cos_sin.stride(1),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), q.stride(0), q.stride(1), q.stride(2),
        NQ=nq, NKV=nkv, HALF=d // 2, HB=hb, num_warps=4)
    return q


def rope_cache_rows(qkv: torch.Tensor, cos_sin: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                    slots: torch.Tensor, nq: int, nkv: int) -> torch.Tensor:
    """Rotary and both cache writes of a prefill (B, T tokens): the hand-written kernel
    where it serves, else ``rope_cache`` uncompiled (the CPU; an odd head size)."""
    if _triton_rope_serves(qkv, cos_sin, cache_k, cache_v):
        return rope_cache_rows_triton(qkv, cos_sin, cache_k, cache_v, slots, nq, nkv)
    return rope_cache(qkv, cos_sin, cache_k, cache_v, slots, nq, nkv)
