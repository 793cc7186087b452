"""Prompts for a cell: datasets, templates, seeded sampling, tokenizer, batching."""
from .batching import Batch, make_batches
from .datasets import DATASETS, DatasetError, Prompt, count_words, load_prompts
from .tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, get_tokenizer

__all__ = ["Batch", "make_batches", "DATASETS", "DatasetError", "Prompt", "count_words", "load_prompts",
           "ByteTokenizer", "SentencePieceTokenizer", "Tokenizer", "get_tokenizer"]
