import json

import pytest
import torch

from tunelite.config import asset_path
from tunelite.data import alpaca_dataset, padded_collate
from tunelite.errors import DataError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.tokenizers import llama3_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer(asset_path("tiny/tokenizer.model"))


def write_rows(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.mark.parametrize("train_on_input", [False, True])
def test_prompt_tokens_are_masked_unless_train_on_input(tmp_path, tokenizer, train_on_input):
    source = write_rows(tmp_path / "d.json", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    sample = alpaca_dataset(tokenizer, source, train_on_input=train_on_input)[0]
    trained = [t for t, l in zip(sample["tokens"], sample["labels"]) if l != IGNORE_INDEX]
    if train_on_input:
        assert trained == sample["tokens"]
    else:
        text = tokenizer.decode(trained, skip_special_tokens=False)
        assert text.startswith("<|start_header_id|>assistant") and "Blue." in text and "Name a colour" not in text


def test_missing_column_names_file_row_and_column(tmp_path, tokenizer):
    source = write_rows(tmp_path / "d.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"d.json, row 1: column 'output' is missing"):
        alpaca_dataset(tokenizer, source)


def test_malformed_jsonl_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: malformed JSON"):
        alpaca_dataset(tokenizer, str(path))


def test_collate_pads_to_longest_and_shifts_labels():
    batch = [{"tokens": [1, 2, 3], "labels": [-100, 2, 3]}, {"tokens": [4, 5], "labels": [4, 5]}]
    out = padded_collate(batch, pad_id=0)
    assert out["tokens"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert out["labels"].tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert padded_collate(batch, pad_id=0, pad_to_multiple_of=8)["tokens"].shape == torch.Size([2, 8])
