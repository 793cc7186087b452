"""Prompt sources: synthetic texts, Stanford Alpaca (JSON list), GSM8K (JSON lines).

Every prompt keeps the index of its record in the file as ``prompt_id``, so a
response can be traced back to its record whatever the sampling.
"""
from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("synthetic", "alpaca", "gsm8k")

# The Stanford Alpaca prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_WORDS = ("the power of a card grows with its clock and the energy per token falls as the batch grows "
          "while memory bandwidth bounds decoding speed model weights stream from memory once per step "
          "a cluster runs many jobs and each job reports watts tokens words seconds joules").split()


# What each file must be; the planner checks a file's first record against it
# (``first_record_problem``) so that a wrong file is refused before a cell is queued.
EXPECTED = {
    "alpaca": 'a JSON array whose first element is an object with an "instruction" string',
    "gsm8k": 'JSON Lines whose first line is an object with a "question" string',
}
RECORD_KEY = {"alpaca": "instruction", "gsm8k": "question"}  # the string each record must have


class DatasetError(ValueError):
    """A dataset file is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    text: str


def load_prompts(dataset: str, path: str | None, n_prompts: int, seed: int) -> list[Prompt]:
    """``n_prompts`` prompts sampled with ``seed``: without replacement, or with
    replacement (and a warning) when the file has fewer records."""
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if n_prompts < 1:
        raise DatasetError(f"n_prompts={n_prompts}; valid: >= 1")
    if dataset == "synthetic":
        return synthetic_prompts(n_prompts, seed)
    if not path:
        raise DatasetError(f"dataset {dataset!r} needs a path to its file")
    records = read_alpaca(path) if dataset == "alpaca" else read_gsm8k(path)
    return sample(records, n_prompts, seed, source=path)


def synthetic_prompts(n_prompts: int, seed: int) -> list[Prompt]:
    """Deterministic word salad of 4 to 24 words, varied so that batches need padding.
    At most about 260 bytes: within the default max_prompt_tokens (256) even for the
    byte-level tokenizer the tiny model falls back to, so no prompt is cut."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n_prompts):
        n_words = rng.randint(4, 24)
        prompts.append(Prompt(i, " ".join(rng.choice(_WORDS) for _ in range(n_words))))
    return prompts


def sample(records: list[str], n_prompts: int, seed: int, *, source: str) -> list[Prompt]:
    rng = random.Random(seed)
    if n_prompts <= len(records):
        ids = rng.sample(range(len(records)), n_prompts)
    else:
        warnings.warn(f"{source} has {len(records)} records, fewer than n_prompts={n_prompts}: "
                      "sampling with replacement", UserWarning, stacklevel=3)
        ids = rng.choices(range(len(records)), k=n_prompts)
    return [Prompt(i, records[i]) for i in ids]


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = p.read_bytes()[: err.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {err.object[err.start]:#04x}); "
                           f"convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
    if not text.strip():
        raise DatasetError(f"{path}: the file is empty")
    return text


def read_alpaca(path: str) -> list[str]:
    """The Alpaca JSON list of {instruction, input, output}, as templated prompts."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list of {{instruction, input, output}} records")
    prompts = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise DatasetError(f"{path}: record {i} has no 'instruction' string")
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise DatasetError(f"{path}: record {i} has an 'input' that is not a string ({type(extra).__name__})")
        template = ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT
        prompts.append(template.format(instruction=rec["instruction"], input=extra))
    return prompts


def read_gsm8k(path: str) -> list[str]:
    """GSM8K JSON lines of {question, answer}: the question is the prompt."""
    prompts = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise DatasetError(f"{path}:{lineno}: expected an object with a 'question' string")
        prompts.append(rec["question"])
    return prompts


def first_record_problem(dataset: str, head: str, whole: bool) -> str | None:
    """What makes ``head`` (the beginning of a file) not the start of a ``dataset``
    file, judged from its first record; None when it looks right. ``whole``: head
    is the entire file. A first record cut by the end of head is judged only by
    how it begins: the worker still reads every record."""
    text = head.lstrip()
    if dataset == "gsm8k":
        line, newline, _ = text.partition("\n")
        return _record_problem(dataset, line, "its first line", cut=not newline and not whole)
    if not text.startswith("["):
        return f"it begins with {_shown(text)}, not a JSON array"
    rest = text[1:].lstrip()
    if rest.startswith("]"):
        return "it holds no records"
    return _record_problem(dataset, rest, "its first element", cut=not whole)


def _record_problem(dataset: str, text: str, where: str, *, cut: bool) -> str | None:
    """The first JSON value of ``text`` must be an object with a string under the
    dataset's key. ``cut``: text may end inside that value (the rest of the file unread)."""
    text = text.strip()
    if not text.startswith("{"):
        return f"{where} is not a JSON object: it begins with {_shown(text)}"
    try:
        record, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        at_end = err.msg.startswith("Unterminated string") or err.pos >= len(text) - 6  # \uXXXX cut short
        if cut and at_end:
            return None  # longer than the part read: the worker judges it
        return f"{where} is not valid JSON ({err.msg} at character {err.pos + 1}): {_shown(text)}"
    key = RECORD_KEY[dataset]
    if not isinstance(record.get(key), str):
        keys = ", ".join(map(str, record)) or "none"
        return f"{where} has no {key!r} string (its keys: {keys})"
    return None


def _shown(text: str, n_chars: int = 40) -> str:
    """The first characters of a record, for a message that must stay one line."""
    first = " ".join(text.split())
    return repr(first[:n_chars] + ("..." if len(first) > n_chars else ""))


def count_words(text: str) -> int:
    """Whitespace-separated words, the paper's words/s unit."""
    return len(text.split())
