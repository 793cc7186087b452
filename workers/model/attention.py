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

Work split (flash-decoding): each program takes one (row, key/value head, key
chunk) and a second small kernel merges the chunks' partial softmaxes (one chunk:
the first kernel writes the output itself). The query heads that share a
key/value head (one in LLaMA-1, eight in Llama-2-70B) are the rows of a tile of
at least 16, so both products run on tensor cores (``tl.dot``), which lets
Triton pipeline the key and value loads; the unused rows cost no memory
traffic. An 8-bit cache is widened to the query's dtype after the load.

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

# Launch settings, chosen with benchmarks/attention_bench.py on an H100 (docs/performance.md)
BLOCK_N = 64  # keys per loop iteration of a program
MAX_SPLITS = 16  # key chunks per head at most, where rows x heads are few (batch 1)
# ... and where they fill the card (>= BUSY programs without splitting): one chunk,
# no merge kernel. On an H100 at 384 slots (255 used) that took the kernel from 104 to
# 94 us at batch 64 (67 -> 58 us with an 8-bit cache) and from 13.6 to 9.0 us at batch 8,
# and the whole 7B step 4% faster at batch 64 (docs/performance.md); 4 chunks before.
MAX_SPLITS_BUSY = 1
BUSY = 256
NUM_WARPS = 4
NUM_STAGES = 3  # software pipelining of the key/value loads


def sdpa_over_cache(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA of q (B, Hq, T, D) over cache slots (B, Hkv, S, D): an 8-bit cache widened to
    q's dtype (SDPA takes no 8-bit inputs), each key/value head repeated for the query
    heads that share it (grouped-query attention)."""
    if keys.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    rep = q.shape[1] // keys.shape[1]
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def decode_attention_reference(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                               pads: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """q: (B, Hq, 1, D); caches: (B, Hkv, S, D); pads: (B,); pos: (1,) the last slot written.
    Row b attends to slots pads[b]..pos. Returns (B, Hq, 1, D)."""
    b, s = q.shape[0], cache_k.shape[2]
    keys = torch.arange(s, device=q.device)
    allowed = (keys[None, :] >= pads[:, None]) & (keys[None, :] <= pos)
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    return sdpa_over_cache(q, cache_k, cache_v, mask.view(b, 1, 1, s))


def plan_splits(max_keys: int, block_n: int | None = None, max_splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk): at most ``max_splits`` chunks of whole ``block_n`` blocks. Few
    rows x heads (batch 1) want many short chunks, so that enough programs load at
    once; many (batch 64) want few long ones, whose loop Triton pipelines. Chunks
    past ``pos`` return at once."""
    block_n, max_splits = block_n or BLOCK_N, max_splits or MAX_SPLITS
    blocks = math.ceil(max_keys / block_n)
    chunk = math.ceil(blocks / max_splits) * block_n
    return math.ceil(max_keys / chunk), chunk


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     pads: torch.Tensor, pos: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """As ``decode_attention_reference``; the Triton kernel on CUDA. ``splits`` caps the
    key-chunk count (benchmarks and tests vary it)."""
    if not available(q.device):
        return decode_attention_reference(q, cache_k, cache_v, pads, pos)
    b, hq, t, d = q.shape
    hkv, s = cache_k.shape[1], cache_k.shape[2]
    if t != 1 or hq % hkv or cache_k.stride(3) != 1 or cache_v.stride(3) != 1:
        raise ValueError(f"decode attention takes one query per row and unit-stride heads; got q {tuple(q.shape)}")
    q = q.contiguous()
    splits, chunk = plan_splits(s, BLOCK_N, splits or (MAX_SPLITS_BUSY if b * hkv >= BUSY else MAX_SPLITS))
    out = torch.empty_like(q)
    d_p2 = max(16, triton.next_power_of_2(d))  # tl.dot needs 16 at least
    if splits == 1:
        part_m = part_l = part_acc = out  # unused by the kernel when it writes the output
    else:
        part_m = torch.empty((b, hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((b, hq, splits, d), dtype=torch.float32, device=q.device)
    args = (q, cache_k, cache_v, pads, pos, out, part_m, part_l, part_acc,
            q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
            cache_v.stride(0), cache_v.stride(1), cache_v.stride(2), 1.0 / math.sqrt(d), hq // hkv)
    _chunk_kernel[(b, hkv, splits)](
        *args, CHUNK=chunk, BLOCK_N=BLOCK_N, BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)), D=d,
        D_P2=d_p2, SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if splits > 1:
        _merge_kernel[(b, hq)](part_m, part_l, part_acc, out, SPLITS=splits,
                               SPLITS_P2=triton.next_power_of_2(splits), D=d, D_P2=d_p2, num_warps=1)
    return out


if triton is not None:
    @triton.jit
    def _chunk_kernel(Q, K, V, Pads, Pos, Out, PartM, PartL, PartAcc,
                      sqb, sqh, skb, skh, sks, svb, svh, svs, scale, n_rep,
                      CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                      D_P2: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr):
        """One (row, key/value head, chunk): its n_rep query heads as rows of a tile of
        BLOCK_H (>= 16) rows; fp32 inputs multiply in full precision (IEEE), not TF32."""
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        lo = tl.maximum(split * CHUNK, tl.load(Pads + row).to(tl.int32))
        hi = tl.minimum(split * CHUNK + CHUNK, tl.load(Pos).to(tl.int32) + 1)
        hrow = tl.arange(0, BLOCK_H)
        hmask = hrow < n_rep
        head = kv_head * n_rep + hrow
        dim = tl.arange(0, D_P2)
        dmask = dim < D
        q = tl.load(Q + row * sqb + head[:, None] * sqh + dim[None, :], mask=hmask[:, None] & dmask[None, :],
                    other=0.0)
        row64 = row.to(tl.int64)
        k_base = K + row64 * skb + kv_head * skh
        v_base = V + row64 * svb + kv_head * svh
        m_run = tl.full([BLOCK_H], -float("inf"), tl.float32)
        l_run = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D_P2], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            valid = slot < hi
            if D == D_P2:
                tile = valid[:, None]
            else:
                tile = valid[:, None] & dmask[None, :]
            k = tl.load(k_base + slot[:, None] * sks + dim[None, :], mask=tile, other=0.0).to(q.dtype)
            v = tl.load(v_base + slot[:, None] * svs + dim[None, :], mask=tile, other=0.0).to(q.dtype)
            if IEEE:
                score = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                score = tl.dot(q, tl.trans(k)) * scale
            score = tl.where(valid[None, :], score, -float("inf"))
            m_new = tl.maximum(m_run, tl.max(score, 1))
            alpha = tl.exp(m_run - m_new)
            p = tl.exp(score - m_new[:, None])
            l_run = l_run * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
            m_run = m_new
        if SPLITS == 1:
            out = acc / l_run[:, None]
            tl.store(Out + row * sqb + head[:, None] * sqh + dim[None, :], out.to(Out.dtype.element_ty),
                     mask=hmask[:, None] & dmask[None, :])
        else:
            idx = (row * tl.num_programs(1) * n_rep + head) * SPLITS + split
            tl.store(PartM + idx, m_run, mask=hmask)
            tl.store(PartL + idx, l_run, mask=hmask)
            tl.store(PartAcc + idx[:, None] * D + dim[None, :], acc, mask=hmask[:, None] & dmask[None, :])

    @triton.jit
    def _merge_kernel(PartM, PartL, PartAcc, Out,
                      SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, D: tl.constexpr, D_P2: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        base = (row * tl.num_programs(1) + head) * SPLITS
        sp = tl.arange(0, SPLITS_P2)
        smask = sp < SPLITS
        m = tl.load(PartM + base + sp, mask=smask, other=-float("inf"))
        l_part = tl.load(PartL + base + sp, mask=smask, other=0.0)
        # an empty chunk has m = -inf and l = 0: weight 0
        w = tl.where(l_part > 0, tl.exp(m - tl.max(m, 0)), 0.0)
        dim = tl.arange(0, D_P2)
        dmask = dim < D
        acc = tl.load(PartAcc + (base + sp[:, None]) * D + dim[None, :], mask=smask[:, None] & dmask[None, :],
                      other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_part * w, 0)
        tl.store(Out + (row * tl.num_programs(1) + head) * D + dim, out.to(Out.dtype.element_ty), mask=dmask)
