"""Decode attention that reads only the cache slots a row uses.

A decode step has one query per row. Attention through
``scaled_dot_product_attention`` needs a key length fixed at graph-capture
time (the generator's 32-key buckets) and an additive mask built every step,
and its kernels are tiled for many queries. Here one Triton kernel reads, for
row ``b``, exactly the slots ``pads[b] .. pos`` of the static cache, with both
bounds read on the device, so one CUDA graph serves every step and no mask is
built. At batch 64 the key/value read is about as many bytes as the weights
(LLaMA-7B, 384 positions), so reading no slot twice and none past ``pos`` is
what the step's speed is made of.

Work split (flash-decoding): each program takes one (row, query head, key
chunk) and a second small kernel merges the chunks' partial softmaxes (one chunk:
the first kernel writes the output itself). Grouped-query heads read their
shared key/value head; the repeats hit L2.

``decode_attention_reference`` is the same computation with SDPA: the CPU path
and the GPU tests' yardstick.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; the CPU path needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 64  # keys per loop iteration of a program
MAX_SPLITS = 16  # key chunks per head at most; longer caches get longer chunks
NUM_WARPS = 4


def decode_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                               pads: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, 1, D); caches: (B, Hkv, S, D); pads: (B,); pos: (1,) the last slot written.
    Row b attends to slots pads[b]..pos. Returns (B, Hq, 1, D)."""
    b, hq, _, _ = q.shape
    hkv, s = cache_k.shape[1], cache_k.shape[2]
    keys = torch.arange(s, device=q.device)
    allowed = (keys[None, :] >= pads[:, None]) & (keys[None, :] <= pos)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    k, v = cache_k, cache_v
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(b, 1, 1, s))


def plan_splits(max_keys: int, block_n: int | None = None, max_splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk). A program's loads are its memory parallelism: a program that
    loops over many key blocks waits on each in turn, so chunks are one block long
    (every program issues its key and value loads at once, and there are many
    programs), up to ``max_splits`` chunks; chunks past ``pos`` return at once."""
    block_n, max_splits = block_n or BLOCK_N, max_splits or MAX_SPLITS
    blocks = math.ceil(max_keys / block_n)
    chunk = math.ceil(blocks / max_splits) * block_n
    return math.ceil(max_keys / chunk), chunk


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     pads: torch.Tensor, pos: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """As ``decode_attention_reference``; the Triton kernel on CUDA. ``splits`` caps the
    key-chunk count (default ``MAX_SPLITS``; benchmarks and tests vary it)."""
    if not available(q.device):
        return decode_attention_reference(q, cache_k, cache_v, pads, pos)
    b, hq, t, d = q.shape
    hkv, s = cache_k.shape[1], cache_k.shape[2]
    if t != 1 or hq % hkv or cache_k.stride(3) != 1 or cache_v.stride(3) != 1:
        raise ValueError(f"decode attention takes one query per row and unit-stride heads; got q {tuple(q.shape)}")
    q = q.contiguous()
    splits, chunk = plan_splits(s, BLOCK_N, splits)
    out = torch.empty_like(q)
    d_p2 = triton.next_power_of_2(d)
    if splits == 1:
        part_m = part_l = part_acc = out  # unused by the kernel when it writes the output
    else:
        part_m = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    _chunk_kernel[(b, hq, splits)](
        q, cache_k, cache_v, pads, pos, out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cache_v.stride(0), cache_v.stride(1), cache_v.stride(2),
        1.0 / math.sqrt(d), hq // hkv, d,
        CHUNK=chunk, BLOCK_N=BLOCK_N, D_P2=d_p2, SPLITS=splits, num_warps=NUM_WARPS)
    if splits > 1:
        _merge_kernel[(b, hq)](part_m, part_l, part_acc, out, d, SPLITS=splits,
                               SPLITS_P2=triton.next_power_of_2(splits), D_P2=d_p2, num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _chunk_kernel(Q, K, V, Pads, Pos, Out, PartM, PartL, PartAcc,
                      sqb, sqh, skb, skh, sks, svb, svh, svs, scale, n_rep, d,
                      CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, D_P2: tl.constexpr, SPLITS: tl.constexpr):
        row, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_head = head // n_rep
        lo = tl.maximum(split * CHUNK, tl.load(Pads + row).to(tl.int32))
        hi = tl.minimum(split * CHUNK + CHUNK, tl.load(Pos).to(tl.int32) + 1)
        dim = tl.arange(0, D_P2)
        dmask = dim < d
        q = tl.load(Q + row * sqb + head * sqh + dim, mask=dmask, other=0.0).to(tl.float32) * scale
        k_base = K + row * skb + kv_head * skh
        v_base = V + row * svb + kv_head * svh
        m_run = -float("inf")
        l_run = 0.0
        acc = tl.zeros([D_P2], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            valid = slot < hi
            tile = valid[:, None] & dmask[None, :]
            k = tl.load(k_base + slot[:, None] * sks + dim[None, :], mask=tile, other=0.0).to(tl.float32)
            v = tl.load(v_base + slot[:, None] * svs + dim[None, :], mask=tile, other=0.0).to(tl.float32)
            score = tl.where(valid, tl.sum(k * q[None, :], 1), -float("inf"))
            m_new = tl.maximum(m_run, tl.max(score, 0))
            alpha = tl.exp(m_run - m_new)
            p = tl.exp(score - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_run = l_run * alpha + tl.sum(p, 0)
            m_run = m_new
        if SPLITS == 1:
            tl.store(Out + row * sqb + head * sqh + dim, (acc / l_run).to(Out.dtype.element_ty), mask=dmask)
        else:
            idx = (row * tl.num_programs(1) + head) * SPLITS + split
            tl.store(PartM + idx, m_run)
            tl.store(PartL + idx, l_run)
            tl.store(PartAcc + idx * d + dim, acc, mask=dmask)

    @triton.jit
    def _merge_kernel(PartM, PartL, PartAcc, Out, d,
                      SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, D_P2: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        base = (row * tl.num_programs(1) + head) * SPLITS
        sp = tl.arange(0, SPLITS_P2)
        smask = sp < SPLITS
        m = tl.load(PartM + base + sp, mask=smask, other=-float("inf"))
        l_part = tl.load(PartL + base + sp, mask=smask, other=0.0)
        # an empty chunk has m = -inf and l = 0: weight 0
        w = tl.where(l_part > 0, tl.exp(m - tl.max(m, 0)), 0.0)
        dim = tl.arange(0, D_P2)
        dmask = dim < d
        acc = tl.load(PartAcc + (base + sp[:, None]) * d + dim[None, :], mask=smask[:, None] & dmask[None, :],
                      other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_part * w, 0)
        tl.store(Out + (row * tl.num_programs(1) + head) * d + dim, out.to(Out.dtype.element_ty), mask=dmask)
