"""Prompt loaders, tokenizers and batching, on the real files where present."""
import json
import warnings
from pathlib import Path

import pytest

from workers.load import (ByteTokenizer, DatasetError, Prompt, count_words, get_tokenizer, load_prompts,
                          make_batches)
from workers.load.datasets import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from conftest import SHARED_DATA

DATA = SHARED_DATA  # ../shared beside the checkout
ALPACA = DATA / "alpaca" / "alpaca_data_1k.json"
GSM8K = DATA / "gsm8k" / "train.jsonl"
SPM = DATA / "tokenizer" / "llama2-tokenizer.model"


def need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"real data file {path} is absent on this machine")


def test_alpaca_real_file_uses_the_stanford_templates():
    need(ALPACA)
    records = json.loads(ALPACA.read_text())
    prompts = load_prompts("alpaca", str(ALPACA), 200, seed=0)
    assert len({p.prompt_id for p in prompts}) == 200  # without replacement
    for p in prompts:
        rec = records[p.prompt_id]
        if rec["input"].strip():
            assert p.text == ALPACA_WITH_INPUT.format(instruction=rec["instruction"], input=rec["input"])
        else:
            assert p.text == ALPACA_NO_INPUT.format(instruction=rec["instruction"])
    assert any("### Input:" in p.text for p in prompts) and any("### Input:" not in p.text for p in prompts)


def test_gsm8k_real_file_question_is_the_prompt_and_sampling_is_seeded():
    need(GSM8K)
    a = load_prompts("gsm8k", str(GSM8K), 50, seed=7)
    b = load_prompts("gsm8k", str(GSM8K), 50, seed=7)
    c = load_prompts("gsm8k", str(GSM8K), 50, seed=8)
    assert a == b and a != c
    lines = GSM8K.read_text().splitlines()
    assert a[0].text == json.loads(lines[a[0].prompt_id])["question"]


def test_sentencepiece_tokenizer_real_model():
    need(SPM)
    tok = get_tokenizer(str(SPM), vocab_size=32000)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000) and tok.pad_id >= 0
    ids = tok.encode("How many clips did Natalia sell?")
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == "How many clips did Natalia sell?"
    with pytest.raises(ValueError, match="vocab_size >= 32000"):
        get_tokenizer(str(SPM), vocab_size=512)


def test_byte_tokenizer_round_trip_and_vocab_check():
    tok = get_tokenizer(None, vocab_size=512)
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode("héllo wörld")
    assert ids[0] == tok.bos_id and max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == "héllo wörld"
    with pytest.raises(ValueError, match="259"):
        get_tokenizer(None, vocab_size=200)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer("/nonexistent/tok.model")


def test_synthetic_is_deterministic_and_varied():
    a = load_prompts("synthetic", None, 20, seed=1)
    assert a == load_prompts("synthetic", None, 20, seed=1)
    assert [p.prompt_id for p in a] == list(range(20))
    assert len({count_words(p.text) for p in a}) > 5


def test_sampling_with_replacement_warns(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": "2"}\n')
    with pytest.warns(UserWarning, match="with replacement"):
        prompts = load_prompts("gsm8k", str(f), 5, seed=0)
    assert len(prompts) == 5 and {p.text for p in prompts} <= {"a?", "b?"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_prompts("gsm8k", str(f), 2, seed=0)) == 2


@pytest.mark.parametrize("dataset,content,match", [
    ("gsm8k", "", "empty"),
    ("gsm8k", '{"question": "ok"}\n{"question": broken\n', ":2: not valid JSON"),
    ("gsm8k", '{"question": "ok"}\n{"answer": "x"}\n', ":2: expected an object with a 'question'"),
    ("alpaca", '[{"instruction": "x", "input": ""},\n {"input": "y"}]', "record 1 has no 'instruction'"),
    ("alpaca", '[{"instruction": "x",\n  oops}]', ":2: not valid JSON"),
])
def test_bad_files_name_the_file_and_line(tmp_path, dataset, content, match):
    f = tmp_path / "data.txt"
    f.write_text(content)
    with pytest.raises(DatasetError, match=match) as err:
        load_prompts(dataset, str(f), 1, seed=0)
    assert str(f) in str(err.value)


def test_missing_file_unknown_dataset_and_missing_path():
    with pytest.raises(DatasetError, match="no such file"):
        load_prompts("alpaca", "/nonexistent/alpaca.json", 1, seed=0)
    with pytest.raises(DatasetError, match="valid: synthetic, alpaca, gsm8k"):
        load_prompts("squad", None, 1, seed=0)
    with pytest.raises(DatasetError, match="needs a path"):
        load_prompts("gsm8k", None, 1, seed=0)


def test_make_batches_truncates_sorts_and_keeps_ids():
    tok = ByteTokenizer()
    prompts = [Prompt(10, "a"), Prompt(11, "abcdefghij"), Prompt(12, "abc"), Prompt(13, "abcdef"), Prompt(14, "ab")]
    batches = make_batches(prompts, tok, batch_size=2, max_prompt_tokens=5, sort_by_length=True)
    assert [b.index for b in batches] == [0, 1, 2]
    assert [len(b.tokens) for b in batches] == [2, 2, 1]
    assert batches[0].prompt_ids == (11, 13) and all(len(t) == 5 for t in batches[0].tokens)
    assert batches[-1].prompt_ids == (10,) and batches[-1].tokens == ((1, ord("a") + 3),)
    # BOS + 10 and BOS + 6 bytes are cut to 5; BOS + 3 and the rest fit: counted, not silent
    assert [b.truncated for b in batches] == [2, 0, 0]
    unsorted = make_batches(prompts, tok, batch_size=4, max_prompt_tokens=64, sort_by_length=False)
    assert unsorted[0].prompt_ids == (10, 11, 12, 13) and sum(b.truncated for b in unsorted) == 0
    with pytest.raises(ValueError, match="batch_size=0"):
        make_batches(prompts, tok, 0, 8, False)


def test_count_words():
    assert count_words("  one two\nthree\tfour ") == 4 and count_words("") == 0


def test_a_dataset_that_is_not_utf8_names_the_line_and_the_fix(tmp_path):
    from workers.load.datasets import DatasetError, read_gsm8k

    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"question": "a"}\n{"question": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9\); convert the file to UTF-8"):
        read_gsm8k(str(f))


def test_an_alpaca_input_that_is_not_text(tmp_path):
    from workers.load.datasets import DatasetError, read_alpaca

    f = tmp_path / "a.json"
    f.write_text('[{"instruction": "add", "input": 5, "output": "x"}]')
    with pytest.raises(DatasetError, match="record 0 has an 'input' that is not a string"):
        read_alpaca(str(f))


# -- the first-record check the planner runs on the beginning of a file

def _head(path: Path, n_bytes: int = 8192) -> str:
    with open(path, "rb") as f:
        return f.read(n_bytes).decode("utf-8", errors="ignore")


def test_first_record_of_the_real_files_fits_their_own_kind_only():
    from workers.load.datasets import first_record_problem

    need(ALPACA), need(GSM8K)
    alpaca, gsm8k = _head(ALPACA), _head(GSM8K)
    assert first_record_problem("alpaca", alpaca, whole=False) is None
    assert first_record_problem("gsm8k", gsm8k, whole=False) is None
    assert first_record_problem("gsm8k", alpaca, whole=False).startswith("its first line is not a JSON object")
    assert first_record_problem("alpaca", gsm8k, whole=False).endswith("not a JSON array")
    # the Alpaca file is one long line: cut after 100 bytes it is still judged by how it begins
    assert first_record_problem("gsm8k", _head(ALPACA, 100), whole=False).startswith("its first line is not a JSON object")


def test_a_first_record_cut_by_the_read_is_left_to_the_worker():
    from workers.load.datasets import first_record_problem

    assert first_record_problem("gsm8k", '{"question": "abc', whole=False) is None
    assert first_record_problem("alpaca", '[{"instruction": "x", "in', whole=False) is None
    assert first_record_problem("alpaca", '[{"instruction": "x", ', whole=False) is None
    # the same text as a whole file is wrong
    assert "not valid JSON" in first_record_problem("gsm8k", '{"question": "abc', whole=True)
    assert "not valid JSON" in first_record_problem("alpaca", '[{"instruction": "x", ', whole=True)


@pytest.mark.parametrize("dataset,content", [
    ("gsm8k", '{"answer": "2"}\n'),
    ("gsm8k", '[{"question": "a"}]\n'),
    ("alpaca", '[{"input": "x"}]'),
    ("alpaca", '{"instruction": "x"}\n'),
    ("alpaca", '[]'),
])
def test_what_the_planner_refuses_the_worker_refuses_too(tmp_path, dataset, content):
    from workers.load.datasets import first_record_problem

    assert first_record_problem(dataset, content, whole=True) is not None
    f = tmp_path / "data.txt"
    f.write_text(content)
    with pytest.raises(DatasetError):
        load_prompts(dataset, str(f), 1, seed=0)
