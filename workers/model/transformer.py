"""LLaMA as in Meta's ``model.py``, on FairScale model-parallel layers.

Layers are named by role (``wq/wk/wv/wo``, ``w1/w2/w3``) so that Meta checkpoint
keys load as they are. Differences from Meta's file, and why:
- The layers are allocated straight on the target device in the target dtype
  (FairScale's constructors allocate float32 on the CPU and build a full master
  weight per layer, far too slow for a 65B shard).
- The KV cache is static (``max_batch_size x kv_heads x max_seq_len x head_dim``)
  and is written at cache *slots* given as a tensor, so that one decode step can
  be captured as a CUDA graph and replayed with no host work.
- Prompts are left-padded: every row of a batch writes the same slot; rotary
  positions are ``slot - pad`` per row, and the mask hides the padding.
- The q/k/v weights of a layer live in one device tensor (``wq/wk/wv.weight``
  are views into it), and so do ``w1``/``w3``: decode runs one matrix-vector
  product where Meta runs three (or two). Fewer, larger kernels stream the
  weights closer to the memory bandwidth, which bounds decode speed.
- Rotary embedding rotates q and k together in one complex multiply.
- Decode steps (one token per row) can take a fused path (``fuse``, on by default
  on CUDA): the elementwise work between the matrix products runs as three
  compiled kernels per call site (``fused.py``), and the residual add of one
  layer is done together with the next layer's RMSNorm. Rotary and both cache
  writes run as one hand-written Triton kernel (``fused.HAND_KERNELS``). The
  matrix products of a one-GPU step at up to four rows of a model 4,096 wide,
  captured as a CUDA graph, stream their weights by TMA (``linear.tma_serves``:
  faster, and no dearer in energy); the others stay on cuBLAS (``linear.py``).
- A prefill of many rows on the fused path runs the same way, with kernels
  compiled for any prompt width (``fused_prefill``, ``forward_prefill``): eager, its elementwise
  work (rotary in complex float32, the cache writes, SiLU, the adds) took a
  quarter of a batch-64 prefill's time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel import initialize as mp
from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from torch import nn

from . import fused, linear
from .args import ModelArgs
from .attention import decode_attention, sdpa_over_cache


def _shard(n: int, what: str) -> int:
    world = mp.get_model_parallel_world_size()
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the model-parallel size {world}")
    return n // world


def _empty(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)


class ColumnLinear(ColumnParallelLinear):
    """FairScale's column-parallel linear (output split), allocated on the device, no bias."""

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool,
                 device: torch.device, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.output_size_per_partition = _shard(out_features, "output features")
        self.weight = _empty((self.output_size_per_partition, in_features), device, dtype)
        self.register_parameter("bias", None)
        self.master_weight = None


class RowLinear(RowParallelLinear):
    """FairScale's row-parallel linear (input split, output all-reduced), no bias."""

    def __init__(self, in_features: int, out_features: int, *, device: torch.device, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, True
        self.input_size_per_partition = _shard(in_features, "input features")
        self.weight = _empty((out_features, self.input_size_per_partition), device, dtype)
        self.register_parameter("bias", None)
        self.master_weight = None


class Embedding(ParallelEmbedding):
    """FairScale's embedding split along the embedding dimension (Meta's choice)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, device: torch.device, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse, self._weight = False, False, None
        self.embedding_dim_per_partition = _shard(embedding_dim, "dim")
        self.weight = _empty((num_embeddings, self.embedding_dim_per_partition), device, dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _empty((dim,), device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel on CUDA (statistics in float32, as Meta's float upcast)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_table(head_dim: int, n_pos: int, theta: float, device: torch.device) -> torch.Tensor:
    """Meta's ``freqs_cis``: (n_pos, head_dim/2) complex64 unit rotations."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(n_pos, device=device).float(), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); freqs: (B, T, 1, D/2) complex. Rotates Meta's interleaved pairs."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def _fuse(layers: list[ColumnLinear], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Give column layers' weights one storage (stacked rows); returns the whole."""
    rows = sum(layer.output_size_per_partition for layer in layers)
    whole = torch.empty((rows, layers[0].in_features), device=device, dtype=dtype)
    start = 0
    for layer in layers:
        n = layer.output_size_per_partition
        layer.weight = nn.Parameter(whole[start:start + n], requires_grad=False)
        start += n
    return whole


def _skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a decode step's product takes the Triton skinny kernel (``linear.py``):
    switched on (``linear.SKINNY``), and where it was measured faster than cuBLAS."""
    return linear.SKINNY and linear.usable(x, weight.shape[0])


def _stream(x: torch.Tensor, weight: torch.Tensor, role: str) -> torch.Tensor:
    """A column-parallel product ``role`` of a decode step (local, no communication): on one
    GPU at few rows the TMA kernel (``linear.tma_serves``; its input is the model's width),
    cuBLAS otherwise. Not with model parallelism until measured there."""
    if mp.get_model_parallel_world_size() == 1 and linear.tma_serves(x, weight, role, x.shape[-1]):
        return linear.tma_linear(x, weight, role=role)
    return F.linear(x, weight)


def _project(x: torch.Tensor, weight: torch.Tensor, role: str) -> torch.Tensor:
    """A column-parallel product of a decode step: the skinny kernel where switched on, else ``_stream``."""
    return linear.skinny_linear(x, weight) if _skinny(x, weight) else _stream(x, weight, role)


def _reduce_project(x: torch.Tensor, layer: RowLinear, role: str) -> torch.Tensor:
    """A row-parallel product of a decode step: local product, then the all-reduce.
    On one GPU, at up to linear.SPLIT_K_MAX_ROWS rows, the result is partial sums,
    one leading dimension more, that the next fused.add_norm adds up
    (linear.partial_products, or the TMA kernel's partials where it serves)."""
    if _skinny(x, layer.weight):
        return reduce_from_model_parallel_region(linear.skinny_linear(x, layer.weight))
    # one GPU only (so no all-reduce): with model parallelism each all-reduce would carry
    # both partials, and a rank's share of K may be too short for cuBLAS to split (not measured)
    if mp.get_model_parallel_world_size() == 1 and linear.split_k_usable(x, layer.weight):
        # a row-parallel product's output is the model's width
        if linear.tma_serves(x, layer.weight, role, layer.weight.shape[0], linear.SPLIT_K_SLICES):
            return linear.tma_linear(x, layer.weight, linear.SPLIT_K_SLICES, role=role)
        return linear.partial_products(x, layer.weight)
    return layer(x)


def _store_slots(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """cache[:, :, slots] = values, in place. index_copy_ has no 8-bit float kernels, so an
    fp8 cache is written through a byte view of itself."""
    if cache.dtype == values.dtype:
        cache.index_copy_(2, slots, values)
    else:
        cache.view(torch.uint8).index_copy_(2, slots, values.to(cache.dtype).view(torch.uint8))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, *, max_batch_size: int, max_seq_len: int,
                 device: torch.device, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hd = args.head_dim
        self.n_local_heads = _shard(args.n_heads, "n_heads")
        self.n_local_kv_heads = _shard(args.kv_heads, "n_kv_heads")
        self.head_dim = hd
        kw = dict(device=device, dtype=dtype)
        self.wq = ColumnLinear(args.dim, args.n_heads * hd, gather_output=False, **kw)
        self.wk = ColumnLinear(args.dim, args.kv_heads * hd, gather_output=False, **kw)
        self.wv = ColumnLinear(args.dim, args.kv_heads * hd, gather_output=False, **kw)
        self.wo = RowLinear(args.n_heads * hd, args.dim, **kw)
        self._wqkv = _fuse([self.wq, self.wk, self.wv], device, dtype)  # not registered: views are
        cache_shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, hd)
        cache_kw = dict(device=device, dtype=kv_dtype or dtype)
        self.register_buffer("cache_k", torch.zeros(cache_shape, **cache_kw), persistent=False)
        self.register_buffer("cache_v", torch.zeros(cache_shape, **cache_kw), persistent=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        b, t, _ = x.shape
        nq, nkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        # the column-parallel q/k/v forward is a plain local matmul: do all three at once
        qkv = F.linear(x, self._wqkv).view(b, t, nq + 2 * nkv, hd)
        qk = apply_rope(qkv[:, :, : nq + nkv], freqs)
        q, k, v = qk[:, :, :nq], qk[:, :, nq:], qkv[:, :, nq + nkv:]
        # every row writes the same slots (left padding): one index_copy per cache
        _store_slots(self.cache_k[:b], slots, k.transpose(1, 2))
        _store_slots(self.cache_v[:b], slots, v.transpose(1, 2))
        return self.wo(self._attend(q.transpose(1, 2), slots, mask, kv_len, None))

    def forward_fused(self, x: torch.Tensor, cos_sin: torch.Tensor, slots: torch.Tensor,
                      mask: torch.Tensor | None, kv_len: int, pads: torch.Tensor | None = None) -> torch.Tensor:
        """As ``forward``, with rotary and both cache writes in one fused kernel;
        ``cos_sin`` is the rotary table as real (cos, sin) pairs. Given ``pads``, attention
        reads each row's slots ``pads[b]..slots[0]`` only (``attention.py``) and ``mask``
        and ``kv_len`` are not used."""
        b, t, _ = x.shape
        nq, nkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        qkv = _project(x, self._wqkv, "wqkv").view(b, t, nq + 2 * nkv, hd)
        q = fused.rope_cache_fast(qkv, cos_sin, self.cache_k[:b], self.cache_v[:b], slots, nq, nkv)
        return _reduce_project(self._attend(q, slots, mask, kv_len, pads), self.wo, "wo")

    def forward_prefill(self, x: torch.Tensor, cos_sin: torch.Tensor, slots: torch.Tensor,
                        mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """As ``forward`` for a whole prompt (T tokens a row), with rotary and both cache
        writes in one kernel (``fused.rope_cache_rows``)."""
        b, t, _ = x.shape
        nq, nkv, hd = self.n_local_heads, self.n_local_kv_heads, self.head_dim
        qkv = F.linear(x, self._wqkv).view(b, t, nq + 2 * nkv, hd)
        q = fused.rope_cache_rows(qkv, cos_sin, self.cache_k[:b], self.cache_v[:b], slots, nq, nkv)
        return self.wo(self._attend(q, slots, mask, kv_len, None))

    def _attend(self, q: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor | None, kv_len: int,
                pads: torch.Tensor | None) -> torch.Tensor:
        """q (B, Hq, T, D) over this layer's cache, as (B, T, Hq * D) ready for the output
        projection: each row's used slots (``pads`` given, one query a row) or the first
        ``kv_len`` under ``mask``."""
        b, _, t, _ = q.shape
        if pads is not None:
            out = decode_attention(q, self.cache_k[:b], self.cache_v[:b], pads, slots)
        else:
            out = sdpa_over_cache(q, self.cache_k[:b, :, :kv_len], self.cache_v[:b, :, :kv_len], mask)
        return out.transpose(1, 2).reshape(b, t, -1)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, *, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, kw = args.ffn_hidden_dim, dict(device=device, dtype=dtype)
        self.w1 = ColumnLinear(args.dim, hidden, gather_output=False, **kw)
        self.w2 = RowLinear(hidden, args.dim, **kw)
        self.w3 = ColumnLinear(args.dim, hidden, gather_output=False, **kw)
        self._w13 = _fuse([self.w1, self.w3], device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self._w13).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _stream(x, self._w13, "w13")  # w1/w3 never took the skinny kernel
        return _reduce_project(fused.SILU_MUL(gate_up), self.w2, "w2")

    def forward_prefill(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(fused.silu_mul_rows_of(F.linear(x, self._w13)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, **kw: object) -> None:
        super().__init__()
        dev = dict(device=kw["device"], dtype=kw["dtype"])
        self.attention = Attention(args, **kw)  # type: ignore[arg-type]
        self.feed_forward = FeedForward(args, **dev)  # type: ignore[arg-type]
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, **dev)  # type: ignore[arg-type]
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, **dev)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs, slots, mask, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_fused(self, x: torch.Tensor, delta: torch.Tensor | None, cos_sin: torch.Tensor,
                      slots: torch.Tensor, mask: torch.Tensor | None, kv_len: int,
                      pads: torch.Tensor | None = None, prefill: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is ``x + delta`` (``delta`` the previous layer's last output,
        not yet added: the add is fused with this layer's first norm). Returns this
        layer's (x, delta) likewise. ``prefill``: a whole prompt, with the prefill's
        kernels (any width, full-size products) instead of a decode step's."""
        add_norm = fused.add_norm_rows if prefill else fused.add_norm
        if delta is None:
            normed = self.attention_norm(x)
        else:
            x, normed = add_norm(x, delta, self.attention_norm.weight, self.attention_norm.eps)
        if prefill:
            attn = self.attention.forward_prefill(normed, cos_sin, slots, mask, kv_len)
        else:
            attn = self.attention.forward_fused(normed, cos_sin, slots, mask, kv_len, pads)
        x, normed = add_norm(x, attn, self.ffn_norm.weight, self.ffn_norm.eps)
        ffn = self.feed_forward.forward_prefill if prefill else self.feed_forward.forward_fused
        return x, ffn(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, *, max_batch_size: int, max_seq_len: int,
                 device: torch.device | str, dtype: torch.dtype, fuse: bool | None = None,
                 kv_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size={args.vocab_size}: give the tokenizer's vocabulary size")
        device = torch.device(device)
        self.args, self.max_batch_size, self.max_seq_len = args, max_batch_size, max_seq_len
        # decode steps take the fused path (see fused.py); a generator's CUDA graphs keep
        # the path that was set when they were captured
        self.fuse = device.type == "cuda" if fuse is None else fuse
        kw = dict(max_batch_size=max_batch_size, max_seq_len=max_seq_len, device=device, dtype=dtype,
                  kv_dtype=kv_dtype)
        self.tok_embeddings = Embedding(args.vocab_size, args.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(TransformerBlock(args, **kw) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, device=device, dtype=dtype)
        self.output = ColumnLinear(args.dim, args.vocab_size, gather_output=True, device=device, dtype=dtype)
        self.register_buffer("rope", rope_table(args.head_dim, max_seq_len, args.rope_theta, device),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                mask: torch.Tensor | None, kv_len: int, last_only: bool = False,
                pads: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (B, T); slots: (T,) cache indices; mask: (B, 1, T, kv_len) additive (0 / -inf).
        Returns float32 logits (B, T, vocab), or (B, 1, vocab) with ``last_only``.
        A fused decode step may instead be given ``pads`` (B,), the first cache slot of
        each row, and no mask: its attention then reads slots ``pads[b]..slots[0]``."""
        h = self.tok_embeddings(tokens)
        decode = self.fuse and tokens.shape[1] == 1
        if not decode and mask is None:
            raise ValueError("the plain path needs a mask; only a fused decode step takes pads instead")
        if decode or self.fused_prefill(tokens.numel()):
            return self._forward_fused(h, positions, slots, mask, kv_len, pads, prefill=not decode,
                                       last_only=last_only)
        freqs = self.rope[positions].unsqueeze(2)
        for layer in self.layers:
            h = layer(h, freqs, slots, mask, kv_len)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def fused_prefill(self, rows: int) -> bool:
        """Whether a prefill of ``rows`` (batch x prompt width) takes the fused path: at
        ``fused.PREFILL_MIN_ROWS`` and more, where its rotary kernel runs."""
        return self.fuse and rows >= fused.PREFILL_MIN_ROWS and fused.prefill_serves(self.args.head_dim, self.device)

    def _forward_fused(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       mask: torch.Tensor | None, kv_len: int, pads: torch.Tensor | None, *,
                       prefill: bool, last_only: bool) -> torch.Tensor:
        """A decode step or a prefill on the fused path, from the embeddings ``h``."""
        cos_sin = torch.view_as_real(self.rope)[positions].unsqueeze(2)
        delta = None
        for layer in self.layers:
            h, delta = layer.forward_fused(h, delta, cos_sin, slots, mask, kv_len, pads, prefill=prefill)
        if not prefill:
            _, normed = fused.add_norm(h, delta, self.norm.weight, self.norm.eps)
        elif last_only:  # B rows: eager (a compile of its own for a strided view would cost more)
            return self.output(self.norm(h[:, -1:] + delta[:, -1:])).float()
        else:
            _, normed = fused.add_norm_rows(h, delta, self.norm.weight, self.norm.eps)
        return self.output(normed).float()

    def weight_bytes(self, streamed_only: bool = True) -> int:
        """Bytes of this rank's weights. ``streamed_only`` leaves out the embedding
        table, of which a decode step reads only one row per sequence."""
        skip = {id(self.tok_embeddings.weight)} if streamed_only else set()
        return sum(p.numel() * p.element_size() for p in self.parameters() if id(p) not in skip)
