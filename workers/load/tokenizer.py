"""Tokenizers: sentencepiece when a ``.model`` file is given, else byte-level.

The byte-level fallback needs no file: id 0 is padding, 1 BOS, 2 EOS, and byte
``b`` is id ``3 + b`` (259 ids in all), so it fits any model vocabulary of at
least 259 entries. It is meant for tests and random-weight runs, where the text
is irrelevant and only the token counts matter.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

BYTE_OFFSET = 3
BYTE_VOCAB = BYTE_OFFSET + 256


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    name: str

    def encode(self, text: str, bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_id, eos_id, pad_id = 1, 2, 0
    vocab_size = BYTE_VOCAB
    name = "bytes"

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path: str) -> None:
        import sentencepiece  # lazy: only when a model file is used

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        # LLaMA's model has no pad piece (-1); padded slots are masked, so any valid id does
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else 0
        self.vocab_size = self._sp.vocab_size()
        self.name = f"sentencepiece:{Path(path).name}"

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])


def get_tokenizer(path: str | None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer for ``path``; ``vocab_size`` (the model's) is checked against it."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist; give a sentencepiece .model "
                                    "file or none for the byte-level tokenizer")
        tok: Tokenizer = SentencePieceTokenizer(path)
    else:
        tok = ByteTokenizer()
    if vocab_size is not None and vocab_size > 0 and tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tok.name} has {tok.vocab_size} ids but the model vocabulary has "
                         f"{vocab_size}; valid: a model vocab_size >= {tok.vocab_size}")
    return tok
