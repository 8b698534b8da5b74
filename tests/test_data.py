"""Data formats, prompt templates, masking, and one-line errors for bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rapidin.data import ALPACA_NO_INPUT, load_examples, tokenize
from rapidin.errors import DataError


def write(path, text):
    path.write_text(text)
    return str(path)


def test_alpaca_with_and_without_input(tmp_path):
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}]
    examples, fmt = load_examples(write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert fmt == "alpaca"
    assert "### Input:\n1 2\n\n### Response:\n" in examples[0].prompt
    assert examples[1].prompt == ALPACA_NO_INPUT.format(instruction="Hi")
    assert examples[0].id != examples[1].id and examples[1].line == 2


def test_json_csv_parquet_prompt_response(tmp_path):
    rows = [{"prompt": "Q1", "response": "A1"}, {"prompt": "Q2", "response": "A2"}]
    json_path = write(tmp_path / "d.json", json.dumps(rows))
    csv_path = write(tmp_path / "d.csv", "prompt,response\nQ1,A1\nQ2,A2\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    results = [load_examples(p)[0] for p in (json_path, csv_path, str(tmp_path / "d.parquet"))]
    assert all([(e.prompt, e.response) for e in r] == [("Q1", "A1"), ("Q2", "A2")] for r in results)
    assert results[0][0].id == results[1][0].id == results[2][0].id  # content hash, format-independent


def test_chat_messages_use_the_template(tmp_path, tiny):
    tiny.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
                                   "{% if add_generation_prompt %}<assistant>{% endif %}"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    examples, fmt = load_examples(write(tmp_path / "c.jsonl", json.dumps(row)), tokenizer=tiny.tokenizer)
    assert fmt == "chat" and examples[0].prompt == "<user>Hi\n<assistant>" and examples[0].response == "Hello"


def test_prompt_tokens_are_masked_and_truncation_flagged(tiny):
    item = tokenize(tiny.tokenizer, "What is 1 plus 2?", "1 plus 2 is 3.", max_length=512)
    prompt_ids = tiny.tokenizer("What is 1 plus 2?")["input_ids"]
    assert item.input_ids[: item.prompt_len] == prompt_ids and item.input_ids[-1] == tiny.tokenizer.eos_token_id
    short = tokenize(tiny.tokenizer, "What is 1 plus 2?", "1 plus 2 is 3.", max_length=item.prompt_len + 2)
    assert short.truncated and len(short.input_ids) == item.prompt_len + 2


def test_batched_tokenization_equals_one_row_at_a_time(tiny):
    """tokenize_many calls the tokenizer on chunks of rows (7 here: several chunks, the last partial); each row must
    get exactly the ids of its own calls, truncated as one row would be."""
    from rapidin import toy
    from rapidin.data import tokenize_many

    tok = tiny.tokenizer
    pairs = [(r["instruction"], r["output"]) for r in toy.demo_rows(30)]
    for max_length in (512, 12):
        got = tokenize_many(tok, pairs, max_length, chunk=7)
        for (prompt, response), item in zip(pairs, got, strict=True):
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert item.input_ids == ids[:max_length] and item.truncated == (len(ids) > max_length)
            assert item.prompt_len == len(tok(prompt)["input_ids"])
    assert tokenize_many(tok, [], 512) == []


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"bad.jsonl:2: malformed JSON"),
        ("empty.jsonl", "", r"empty.jsonl: data file has no rows"),
        ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', r"missing.jsonl:2: missing field 'output'"),
        ("field.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n', r"field.jsonl:2: field 'instruction' must be a string"),
        ("list.jsonl", '[1, 2]\n', r"list.jsonl:1: expected a JSON object"),
        ("x.txt", 'hello', r"x.txt: unknown data format"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message) as info:
        load_examples(write(tmp_path / name, text))
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(str(tmp_path / "nope.jsonl"))
