"""Tokenised prompts in batches of ``batch_size``, as the paper runs them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .datasets import Prompt
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Batch:
    index: int
    prompt_ids: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]  # one tuple of token ids per prompt, BOS first
    truncated: int = 0  # prompts of this batch cut to max_prompt_tokens


def make_batches(prompts: Sequence[Prompt], tokenizer: Tokenizer, batch_size: int, max_prompt_tokens: int,
                 sort_by_length: bool) -> list[Batch]:
    """Encode with BOS, keep the first ``max_prompt_tokens`` tokens, cut into batches
    (the last may be short). ``sort_by_length`` groups similar lengths (longest
    first, ties in input order) so batches waste less padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; valid: >= 1")
    if max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}; valid: >= 1")
    full = [(p.prompt_id, tokenizer.encode(p.text, bos=True)) for p in prompts]
    # (id, kept tokens, whether the prompt was cut): a cut prompt loses its end, the
    # template's "### Response:" among it, so the results count them.
    encoded = [(pid, tuple(toks[:max_prompt_tokens]), len(toks) > max_prompt_tokens) for pid, toks in full]
    if sort_by_length:
        encoded.sort(key=lambda item: -len(item[1]))
    return [
        Batch(index=i // batch_size,
              prompt_ids=tuple(pid for pid, _, _ in encoded[i:i + batch_size]),
              tokens=tuple(toks for _, toks, _ in encoded[i:i + batch_size]),
              truncated=sum(cut for _, _, cut in encoded[i:i + batch_size]))
        for i in range(0, len(encoded), batch_size)
    ]
