"""The shape of a LLaMA model, in the names of Meta's ``params.json``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many key/value heads as query heads
    vocab_size: int = 32000  # -1 in LLaMA-1's params.json: then taken from the checkpoint
    multiple_of: int = 256  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model arguments {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def check_shards(self, shards: int) -> None:
        """Raise if the heads or widths cannot be split over ``shards`` ranks."""
        for what, n in (("n_heads", self.n_heads), ("n_kv_heads", self.kv_heads), ("dim", self.dim),
                        ("ffn hidden dim", self.ffn_hidden_dim)):
            if n % shards:
                raise ValueError(f"{what}={n} is not divisible by shards={shards}; "
                                 f"valid shard counts divide {what}")
        if self.vocab_size > 0 and self.vocab_size % shards:
            raise ValueError(f"vocab_size={self.vocab_size} is not divisible by shards={shards}")
        if self.dim % self.n_heads or self.head_dim % 2:
            raise ValueError(f"dim={self.dim} must be n_heads={self.n_heads} times an even head size")

    def n_params(self) -> int:
        """Parameter count of the whole (unsharded) model."""
        d, h, kv = self.dim, self.head_dim, self.kv_heads
        attn = d * self.n_heads * h * 2 + d * kv * h * 2
        ffn = 3 * d * self.ffn_hidden_dim
        return self.n_layers * (attn + ffn + 2 * d) + 2 * self.vocab_size * d + d


# Meta's published shapes. LLaMA-1 params.json files say vocab_size -1; 32000 here.
PRESETS: dict[str, ModelArgs] = {
    "llama-tiny": ModelArgs(dim=256, n_layers=2, n_heads=8, vocab_size=512, multiple_of=32, max_seq_len=512),
    "llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "llama-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52),
    "llama-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, max_seq_len=4096),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, max_seq_len=4096),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                            multiple_of=4096, max_seq_len=4096),
}
