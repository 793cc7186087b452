"""Greedy batched generation: prefill, then decode with the static KV cache.

Decode speed decides what an energy number means, so the decode loop does no
host work per token on a GPU:
- each decode step (embedding → layers → argmax → write the token) is captured
  once as a CUDA graph per key-length bucket and replayed; every input lives in
  a static device tensor, and the step advances its own position counters;
- on the fused path, attention reads each row's used cache slots only, with
  the bounds on the device (``attention.py``): one graph serves every step;
  on the plain path it reads the slots up to the current bucket (multiples of
  ``kv_bucket``), one graph per bucket;
- the batch is padded to ``max_batch_size`` rows so one set of graphs serves
  every batch (a short last batch costs what a full one does);
- stop-at-EOS is a device-side flag per row, read by the host every
  ``eos_check_every`` steps only.
On the CPU (or with ``cuda_graph=False``) the same step runs eagerly.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused, linear
from .transformer import Transformer


def left_pad(batch_tokens: list[list[int]], rows: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts in a (rows, L) tensor; rows past the batch repeat row 0.
    Returns (tokens, pad counts)."""
    width = max(len(t) for t in batch_tokens)
    src = batch_tokens + [batch_tokens[0]] * (rows - len(batch_tokens))
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    for i, seq in enumerate(src):
        tokens[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
    pads = torch.tensor([width - len(s) for s in src], dtype=torch.long)
    return tokens, pads


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask to the additive form attention uses, once per step rather than
    once per layer (attention would convert a boolean mask in every layer)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def prefill_mask(pads: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L): causal, padding hidden; a padding query sees itself (no empty rows)."""
    idx = torch.arange(width, device=pads.device)
    causal = idx[None, :] <= idx[:, None]
    real_key = idx[None, None, :] >= pads[:, None, None]
    own = (idx[None, :] == idx[:, None])[None]
    return additive(((causal[None] & real_key) | own).unsqueeze(1), dtype)


# Prefill attention backends, cuDNN left out: with a mask, PyTorch sends attention to
# cuDNN first on Hopper, and cuDNN builds an execution plan (hundreds of ms) for every
# new (batch, width) it sees. Prompt batches differ in width, so that build would land
# inside the measured window, once per batch; these kernels are compiled ahead of time.
PREFILL_SDPA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def forward_full(model: Transformer, tokens: torch.Tensor, pads: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor:
    """Logits of a whole (left-padded) sequence in one pass from slot 0: the prefill,
    and the no-cache reference that tests compare the decode loop against."""
    b, width = tokens.shape
    dev = model.device
    tokens = tokens.to(dev)
    pads = torch.zeros(b, dtype=torch.long, device=dev) if pads is None else pads.to(dev)
    slots = torch.arange(width, device=dev)
    positions = (slots[None, :] - pads[:, None]).clamp(min=0)
    mask = prefill_mask(pads, width, model.norm.weight.dtype)
    with sdpa_kernel(list(PREFILL_SDPA)):
        return model(tokens, positions, slots, mask, width, last_only=last_only)


class Generator:
    def __init__(self, model: Transformer, *, max_batch_size: int, max_seq_len: int, device: str,
                 cuda_graph: bool = True, kv_bucket: int = 32, eos_check_every: int = 16,
                 dynamic_kv: bool | None = None) -> None:
        if max_batch_size > model.max_batch_size or max_seq_len > model.max_seq_len:
            raise ValueError(f"generator wants batch {max_batch_size} x {max_seq_len} tokens but the model's "
                             f"cache holds {model.max_batch_size} x {model.max_seq_len}")
        self.model, self.device = model, torch.device(device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.kv_bucket, self.eos_check_every = kv_bucket, eos_check_every
        self.use_graph = cuda_graph and self.device.type == "cuda"
        # the model's decode path when this generator was made; its graphs keep it.
        # dynamic_kv=False keeps the fused step's attention on SDPA over key buckets
        # (benchmarks compare the two)
        fuse = bool(getattr(model, "fuse", False))
        if dynamic_kv and not fuse:
            raise ValueError("dynamic_kv needs the model's fused decode path (model.fuse = True)")
        self.dynamic_kv = fuse if dynamic_kv is None else dynamic_kv
        if self.dynamic_kv:  # attention finds each row's slots itself: one bucket, one graph
            self.kv_bucket = max_seq_len
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_warm = False
        self._state: dict[str, torch.Tensor] = {}
        self._key_idx = torch.arange(max_seq_len, device=self.device)

    # ------------------------------------------------------------------ public
    def generate(self, batch_tokens: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                 on_phase: Callable[[str], None] | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt: only the new tokens, cut before EOS.
        ``on_phase`` is called with "prefill" and "decode" right after a device
        synchronise; the device is synchronised again before returning."""
        n = len(batch_tokens)
        self._check(batch_tokens, max_new_tokens)
        rows = self.max_batch_size if self.use_graph else n
        self._alloc_state(rows)
        if self.use_graph and not self._graphs:
            self._capture_all()
        if not self._prefill_warm:
            self._warm_prefill()
        with torch.inference_mode():
            self._sync_mark(on_phase, "prefill")
            width = self._prefill(batch_tokens, rows, eos_id)
            self._sync_mark(on_phase, "decode")
            steps = self._decode(width, max_new_tokens, eos_id, n)
            self._sync()
            out = self._state["out"][:n, : steps + 1].tolist() if max_new_tokens else [[] for _ in range(n)]
        return [_cut(seq, eos_id) for seq in out]

    # ----------------------------------------------------------------- details
    def _check(self, batch_tokens: list[list[int]], max_new_tokens: int) -> None:
        n = len(batch_tokens)
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"batch of {n} prompts; valid: 1..{self.max_batch_size}")
        if any(len(t) == 0 for t in batch_tokens):
            raise ValueError("empty prompt: every prompt needs at least one token (the BOS)")
        longest = max(len(t) for t in batch_tokens)
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new exceeds max_seq_len={self.max_seq_len}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}; valid: >= 0")

    def _alloc_state(self, rows: int) -> None:
        if self._state and self._state["tok"].shape[0] == rows:
            return
        if self._graphs:
            raise RuntimeError("graph state was captured for another batch size")
        dev, long = self.device, dict(dtype=torch.long, device=self.device)
        self._state = {
            "tok": torch.zeros(rows, 1, **long),  # the token each row feeds in next
            "pos": torch.zeros(1, **long),  # the cache slot it is written to
            "step": torch.zeros(1, **long),  # the column of "out" the next token goes to
            "pads": torch.zeros(rows, **long),
            "out": torch.zeros(rows, self.max_seq_len, **long),
            "done": torch.zeros(rows, dtype=torch.bool, device=dev),
            "eos": torch.full((1,), -1, **long),
        }

    def _step(self, kv_len: int) -> None:
        """One decode step on the static state; all on the device, capturable."""
        s = self._state
        rows = s["tok"].shape[0]
        positions = (s["pos"] - s["pads"]).clamp(min=0).view(rows, 1)
        if self.dynamic_kv:
            logits = self.model(s["tok"], positions, s["pos"], None, kv_len, pads=s["pads"])
        else:
            keys = self._key_idx[:kv_len]
            allowed = (keys[None, :] >= s["pads"][:, None]) & (keys[None, :] <= s["pos"])
            mask = additive(allowed.view(rows, 1, 1, kv_len), self.model.norm.weight.dtype)
            logits = self.model(s["tok"], positions, s["pos"], mask, kv_len)
        nxt = logits[:, -1].argmax(dim=-1)
        s["out"].index_copy_(1, s["step"], nxt.view(rows, 1))
        s["done"] |= nxt == s["eos"]
        s["tok"].copy_(nxt.view(rows, 1))
        s["pos"] += 1
        s["step"] += 1

    def _buckets(self) -> list[int]:
        return sorted({min(b, self.max_seq_len) for b in range(self.kv_bucket, self.max_seq_len + self.kv_bucket,
                                                                  self.kv_bucket)})

    def _bucket(self, n_keys: int) -> int:
        return min(-(-n_keys // self.kv_bucket) * self.kv_bucket, self.max_seq_len)

    def _capture_all(self) -> None:
        """Capture one graph per key bucket. Runs touch only cache slot 0 and the
        state tensors, which every generate call rewrites before use."""
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            pool = torch.cuda.graph_pool_handle()
            with torch.inference_mode(), torch.cuda.stream(side):
                for kv_len in self._buckets():
                    with linear.as_in_graph():  # the kernels the capture takes compile and load here
                        for _ in range(2):  # warm-up on a side stream, as CUDA graph capture needs
                            self._rewind()
                            self._step(kv_len)
                    self._rewind()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                        self._step(kv_len)
                    self._graphs[kv_len] = graph
            torch.cuda.current_stream(self.device).wait_stream(side)
        except RuntimeError as err:  # e.g. a collective that cannot be captured: stay correct, go eager
            warnings.warn(f"CUDA graph capture failed ({err}); decoding eagerly", RuntimeWarning)
            self._graphs.clear()
            self.use_graph = False

    def _warm_prefill(self) -> None:
        """Compile the fused prefill's kernels now, on a prompt of dummy tokens: which
        prompts reach ``fused.PREFILL_MIN_ROWS`` depends on their widths, so the first
        one might come inside a measured window. Compiled once, they serve every width.
        Writes cache slots that every generate call rewrites before reading them."""
        self._prefill_warm = True
        rows = self.max_batch_size
        width = max(2, -(-fused.PREFILL_MIN_ROWS // rows))
        if width > self.max_seq_len or not self.model.fused_prefill(rows * width):
            return  # no prompt batch of this generator takes the fused prefill
        with torch.inference_mode():
            forward_full(self.model, torch.ones(rows, width, dtype=torch.long), last_only=True)

    def _rewind(self) -> None:
        self._state["pos"].zero_()
        self._state["step"].zero_()

    def _prefill(self, batch_tokens: list[list[int]], rows: int, eos_id: int | None) -> int:
        s = self._state
        tokens, pads = left_pad(batch_tokens, rows)
        pads = pads.to(self.device)
        logits = forward_full(self.model, tokens, pads, last_only=True)
        first = logits[:, -1].argmax(dim=-1)
        s["pads"].copy_(pads)
        s["out"][:, 0].copy_(first)
        s["tok"].copy_(first.view(rows, 1))
        s["eos"].fill_(-1 if eos_id is None else eos_id)
        torch.eq(first, s["eos"], out=s["done"])
        width = tokens.shape[1]
        s["pos"].fill_(width)
        s["step"].fill_(1)
        return width

    def _decode(self, width: int, max_new_tokens: int, eos_id: int | None, n: int) -> int:
        """Run up to max_new_tokens - 1 steps; returns how many ran."""
        steps = 0
        for steps in range(1, max_new_tokens):
            if eos_id is not None and (steps - 1) % self.eos_check_every == 0 and bool(self._state["done"][:n].all()):
                return steps - 1
            kv_len = self._bucket(width + steps)  # slot width+steps-1 is written, so that many + 1 keys
            if self.use_graph:
                self._graphs[kv_len].replay()
            else:
                self._step(kv_len)
        return max(0, max_new_tokens - 1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sync_mark(self, on_phase: Callable[[str], None] | None, phase: str) -> None:
        self._sync()
        if on_phase is not None:
            on_phase(phase)


def _cut(seq: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in seq:
        return seq[: seq.index(eos_id)]
    return seq
