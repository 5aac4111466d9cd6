import csv
import dataclasses
import json
import random
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_model
from tunelite.config import asset_path
from tunelite.data import alpaca_dataset, chat_dataset, instruct_dataset, padded_collate, text_completion_dataset
from tunelite.errors import ConfigError, DataError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.tokenizers import llama3_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer(asset_path("tiny/tokenizer.model"))


def write_table(path, rows):
    """Rows as a file in the format its suffix names; returns the path as a string."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


ALPACA_ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]
TABLE_FORMATS = [".json", ".jsonl", ".csv", ".parquet"]


def all_samples(dataset):
    return [dataset[i] for i in range(len(dataset))]


def trained_text(tokenizer, sample):
    """The text of the tokens a sample trains on (its labels that are not -100)."""
    return tokenizer.decode([l for l in sample["labels"] if l != IGNORE_INDEX], skip_special_tokens=False)


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on_input", [False, True])
def test_prompt_tokens_are_masked_unless_train_on_input(tmp_path, tokenizer, train_on_input):
    source = write_table(tmp_path / "d.json", [{"instruction": "Name a colour.", "input": "", "output": "Blue."}])
    sample = alpaca_dataset(tokenizer, source, train_on_input=train_on_input)[0]
    trained = [t for t, l in zip(sample["tokens"], sample["labels"]) if l != IGNORE_INDEX]
    if train_on_input:
        assert trained == sample["tokens"]
    else:
        text = tokenizer.decode(trained, skip_special_tokens=False)
        assert text.startswith("<|start_header_id|>assistant") and "Blue." in text and "Name a colour" not in text


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
SHAREGPT_CHAT = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in CHAT]


def test_multi_turn_chat_trains_only_assistant_turns(tmp_path, tokenizer):
    source = write_table(tmp_path / "c.jsonl", [{"messages": CHAT}])
    trained = trained_text(tokenizer, chat_dataset(tokenizer, source)[0])
    assert "Paris." in trained and "Madrid." in trained
    assert not any(word in trained for word in ("Be brief", "France", "Spain", "user", "system"))


def test_chat_train_on_input_trains_every_turn(tmp_path, tokenizer):
    source = write_table(tmp_path / "c.jsonl", [{"messages": CHAT}])
    sample = chat_dataset(tokenizer, source, train_on_input=True)[0]
    assert sample["labels"] == sample["tokens"]


@pytest.mark.parametrize("style", ["auto", "sharegpt"])
def test_sharegpt_layout_gives_the_same_sample_as_openai(tmp_path, tokenizer, style):
    openai = chat_dataset(tokenizer, write_table(tmp_path / "o.jsonl", [{"messages": CHAT}]))[0]
    sharegpt_source = write_table(tmp_path / "s.jsonl", [{"conversations": SHAREGPT_CHAT}])
    assert chat_dataset(tokenizer, sharegpt_source, conversation_style=style)[0] == openai


def test_system_prompt_is_added_only_to_conversations_without_one(tmp_path, tokenizer):
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT[:3]}]
    samples = all_samples(chat_dataset(tokenizer, write_table(tmp_path / "c.json", rows), system_prompt="Be kind."))
    texts = [tokenizer.decode(s["tokens"]) for s in samples]
    assert "Be kind." in texts[0] and "Be brief." not in texts[0]
    assert "Be brief." in texts[1] and "Be kind." not in texts[1]


def test_chat_with_a_named_column_detects_the_layout_from_its_turns(tmp_path, tokenizer):
    source = write_table(tmp_path / "c.jsonl", [{"dialog": SHAREGPT_CHAT}])
    expected = chat_dataset(tokenizer, write_table(tmp_path / "o.jsonl", [{"messages": CHAT}]))[0]
    assert chat_dataset(tokenizer, source, column="dialog")[0] == expected


# --- formats, globs, the hub -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", TABLE_FORMATS)
def test_instruct_rows_read_the_same_from_every_table_format(tmp_path, tokenizer, suffix):
    reference = all_samples(alpaca_dataset(tokenizer, write_table(tmp_path / "ref.jsonl", ALPACA_ROWS)))
    assert all_samples(alpaca_dataset(tokenizer, write_table(tmp_path / f"d{suffix}", ALPACA_ROWS))) == reference


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_chat_rows_read_the_same_from_every_nested_format(tmp_path, tokenizer, suffix):
    reference = all_samples(chat_dataset(tokenizer, write_table(tmp_path / "ref.jsonl", [{"messages": CHAT}])))
    assert all_samples(chat_dataset(tokenizer, write_table(tmp_path / f"d{suffix}", [{"messages": CHAT}]))) == reference


@pytest.mark.parametrize("suffix", TABLE_FORMATS)
def test_text_completion_reads_a_text_column_from_every_table_format(tmp_path, tokenizer, suffix):
    rows = [{"text": "The sky is blue.", "id": "1"}, {"text": "Grass is green.", "id": "2"}]
    source = write_table(tmp_path / f"d{suffix}", rows)
    samples = all_samples(text_completion_dataset(tokenizer, source, max_seq_len=64))
    assert [s["tokens"] for s in samples] == [tokenizer.encode(r["text"]) for r in rows]
    assert all(s["labels"] == s["tokens"] for s in samples)


def test_txt_file_is_one_document_or_one_per_blank_line_block(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text("First para.\nStill first.\n\n  \nSecond para.\n")
    whole = all_samples(text_completion_dataset(tokenizer, str(path), max_seq_len=256))
    blocks = all_samples(text_completion_dataset(tokenizer, str(path), max_seq_len=256, document_split="blank_lines"))
    assert [s["tokens"] for s in whole] == [tokenizer.encode(path.read_text())]
    assert [s["tokens"] for s in blocks] == [tokenizer.encode(t) for t in ("First para.\nStill first.", "Second para.")]


def test_long_document_is_chunked_and_every_token_is_a_target_once(tmp_path, tokenizer):
    text = " ".join(f"word{i}" for i in range(60))
    source = write_table(tmp_path / "d.jsonl", [{"text": text}])
    dataset = text_completion_dataset(tokenizer, source, max_seq_len=16)
    ids = tokenizer.encode(text)
    assert len(dataset) > 2 and all(len(s["tokens"]) <= 16 for s in all_samples(dataset))
    labels = torch.cat([padded_collate([s], pad_id=0)["labels"][0] for s in all_samples(dataset)])
    assert labels[labels != IGNORE_INDEX].tolist() == ids[1:]


def test_glob_source_reads_every_matching_file_in_sorted_order(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    write_table(tmp_path / "data" / "b.jsonl", ALPACA_ROWS[1:])
    write_table(tmp_path / "data" / "a.jsonl", ALPACA_ROWS[:1])
    reference = all_samples(alpaca_dataset(tokenizer, write_table(tmp_path / "all.jsonl", ALPACA_ROWS)))
    assert all_samples(alpaca_dataset(tokenizer, str(tmp_path / "data" / "*.jsonl"))) == reference


def test_glob_matching_nothing_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="matches no files"):
        alpaca_dataset(tokenizer, str(tmp_path / "*.jsonl"))


def test_hub_name_without_datasets_installed_says_how_to_install(tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install datasets .*tunelite\[datasets\]"):
        alpaca_dataset(tokenizer, "tatsu-lab/alpaca")


def test_hub_name_is_loaded_through_datasets_with_its_split(tokenizer, monkeypatch, tmp_path):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return ALPACA_ROWS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = all_samples(alpaca_dataset(tokenizer, "someone/instructions", split="train[:3]"))
    assert calls == [("someone/instructions", "train[:3]")]
    assert hub == all_samples(alpaca_dataset(tokenizer, write_table(tmp_path / "d.jsonl", ALPACA_ROWS)))


def test_instruct_column_map_and_prompt_template(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", [{"prompt": "Name a colour.", "response": "Blue."}])
    sample = instruct_dataset(
        tokenizer, source, column_map={"instruction": "prompt", "output": "response"},
        prompt_template="Q: {instruction}",
    )[0]
    assert "Q: Name a colour." in tokenizer.decode(sample["tokens"])
    assert "Blue." in trained_text(tokenizer, sample) and "Q:" not in trained_text(tokenizer, sample)


@pytest.mark.parametrize(
    "template, message",
    [
        ("Q: {question}", "placeholders must be"),
        ("{input}", "placeholders must be"),
        ("Q: {instruction", "literal braces"),
    ],
)
def test_bad_prompt_template_is_a_config_error(tmp_path, tokenizer, template, message):
    source = write_table(tmp_path / "d.jsonl", ALPACA_ROWS)
    with pytest.raises(ConfigError, match=message):
        instruct_dataset(tokenizer, source, prompt_template=template)


def test_input_that_the_template_cannot_show_is_an_error(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", ALPACA_ROWS)
    message = r"d.jsonl, line 2: column 'input' is not empty but prompt_template has no \{input\}"
    with pytest.raises(DataError, match=message):
        instruct_dataset(tokenizer, source, prompt_template="Q: {instruction}")


# --- truncation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on_input", [False, True])
def test_sample_whose_response_is_cut_entirely_is_skipped_with_one_warning(tmp_path, tokenizer, train_on_input):
    long_prompt = {"instruction": "Describe the sky " * 30, "input": "", "output": "Blue."}
    source = write_table(tmp_path / "d.jsonl", [ALPACA_ROWS[0], long_prompt, ALPACA_ROWS[2]])
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 train rows .* raise max_seq_len") as record:
        dataset = alpaca_dataset(tokenizer, source, max_seq_len=100, train_on_input=train_on_input)
    assert len(record) == 1 and len(dataset) == 2
    assert all(len(s["tokens"]) <= 100 for s in all_samples(dataset))


def test_every_sample_skipped_is_an_error(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", [{"instruction": "Describe the sky " * 30, "output": "Blue."}])
    with pytest.raises(DataError, match="raise max_seq_len"):
        alpaca_dataset(tokenizer, source, max_seq_len=50)


def test_sample_cut_inside_its_response_is_kept_and_ends_on_an_untrained_eos(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", [{"instruction": "Hi.", "output": "The sky is blue. " * 20}])
    sample = alpaca_dataset(tokenizer, source, max_seq_len=100)[0]
    assert len(sample["tokens"]) == 100 and sample["tokens"][-1] == tokenizer.eos_id
    assert sample["labels"][-1] == IGNORE_INDEX and "The sky" in trained_text(tokenizer, sample)


# --- validation partition ----------------------------------------------------------------------


def test_val_fraction_partitions_are_disjoint_cover_the_rows_and_ignore_the_global_seed(tmp_path, tokenizer):
    rows = [{"instruction": f"Count to {i}.", "output": str(i)} for i in range(20)]
    source = write_table(tmp_path / "d.jsonl", rows)

    def outputs(**kwargs):
        return [tokenizer.decode(s["tokens"]) for s in all_samples(alpaca_dataset(tokenizer, source, **kwargs))]

    random.seed(1)
    torch.manual_seed(1)
    train = outputs(val_fraction=0.25)
    random.seed(2)
    torch.manual_seed(2)
    validation = outputs(val_fraction=0.25, partition="validation")
    assert len(train) == 15 and len(validation) == 5
    assert not set(train) & set(validation)
    assert sorted(train + validation) == sorted(outputs())
    assert outputs(val_fraction=0.25, partition="validation") == validation


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"partition": "validation"}, ConfigError, "needs val_fraction above 0"),
        ({"val_fraction": 1.0}, ConfigError, r"val_fraction must be in \[0, 1\)"),
        ({"val_fraction": 0.5, "partition": "test"}, ConfigError, "partition must be one of train, validation"),
        ({"val_fraction": 0.9}, DataError, "leaves no rows to train on"),
    ],
)
def test_bad_partition_settings_are_named(tmp_path, tokenizer, kwargs, error, message):
    source = write_table(tmp_path / "d.jsonl", ALPACA_ROWS[:2])
    with pytest.raises(error, match=message):
        alpaca_dataset(tokenizer, source, **kwargs)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda t, src: alpaca_dataset(t, src, packed=True), "packed: True needs max_seq_len"),
        (lambda t, src: instruct_dataset(t, src, column_map={"prompt": "q"}), r"column_map: unknown keys \['prompt'\]"),
        (lambda t, src: chat_dataset(t, src, conversation_style="alpaca"), "conversation_style must be one of"),
        (lambda t, src: text_completion_dataset(t, src, max_seq_len=9, document_split="lines"), "document_split must"),
        (lambda t, src: text_completion_dataset(t, src), "needs max_seq_len"),
    ],
)
def test_bad_builder_options_are_config_errors(tmp_path, tokenizer, build, message):
    with pytest.raises(ConfigError, match=message):
        build(tokenizer, write_table(tmp_path / "d.jsonl", ALPACA_ROWS))


# --- packing and collation ---------------------------------------------------------------------

PACK_ROWS = [{"instruction": f"Say {w}.", "output": f"{w} " * n} for w, n in
             [("one", 2), ("two", 5), ("three", 1), ("four", 7), ("five", 3), ("six", 4), ("seven", 2)]]


def test_packs_are_max_seq_len_long_with_positions_restarting_per_sample(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", PACK_ROWS)
    unpacked = all_samples(instruct_dataset(tokenizer, source, prompt_template="{instruction}"))
    packs = all_samples(
        instruct_dataset(tokenizer, source, prompt_template="{instruction}", max_seq_len=64, packed=True)
    )
    assert 1 < len(packs) < len(unpacked)
    assert all(len(p[key]) == 64 for p in packs for key in ("tokens", "labels", "positions", "document_ids"))

    def packed_values(key, in_sample=True):
        return [v for p in packs for v, d in zip(p[key], p["document_ids"]) if (d >= 0) == in_sample]

    assert packed_values("positions") == [i for s in unpacked for i in range(len(s["tokens"]))]
    assert packed_values("tokens") == [t for s in unpacked for t in s["tokens"]]
    assert set(packed_values("tokens", in_sample=False)) == {tokenizer.pad_id}


def test_collate_passes_document_ids_for_packs_and_nothing_more_unpacked():
    pack = {"tokens": [1, 2, 3, 4, 0], "labels": [1, 2, IGNORE_INDEX, 4, IGNORE_INDEX],
            "positions": [0, 1, 0, 1, 0], "document_ids": [0, 0, 1, 1, -1]}
    out = padded_collate([pack, {**pack, **{k: v[:3] for k, v in pack.items()}}], pad_id=0)
    assert out["document_ids"].tolist() == [[0, 0, 1, 1, -1], [0, 0, 1, -1, -1]]  # padding is document -1
    assert out["positions"].tolist() == [[0, 1, 0, 1, 0], [0, 1, 0, 0, 0]]
    assert out["labels"].tolist()[0] == [2, IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX]
    assert "mask" not in out  # no (b, 1, s, s) tensor: at 128k tokens it alone would be 16 GiB
    assert set(padded_collate([{"tokens": [1, 2], "labels": [1, 2]}], pad_id=0)) == {"tokens", "labels"}


def test_packed_per_sample_losses_equal_unpacked_ones(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", PACK_ROWS)
    # train_on_input trains each sample's first token too, so a label leaking across a sample
    # boundary (the last token predicting the next sample's <bos>) would add a loss term.
    options = {"prompt_template": "{instruction}", "train_on_input": True}
    unpacked = all_samples(instruct_dataset(tokenizer, source, **options))
    packs = all_samples(instruct_dataset(tokenizer, source, max_seq_len=100, packed=True, **options))
    assert [max(p["document_ids"]) + 1 for p in packs] == [3, 2, 2]  # samples of 24 to 44 tokens
    model = random_model(dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size)).eval()

    def token_losses(batch):
        hidden = model.hidden_states(batch["tokens"], batch.get("positions"),
                                     document_ids=batch.get("document_ids"))
        logits = model.output(hidden).float()
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none")

    with torch.no_grad():
        alone = [token_losses(padded_collate([s], pad_id=tokenizer.pad_id))[0] for s in unpacked]
        batch = padded_collate(packs, pad_id=tokenizer.pad_id)
        losses = token_losses(batch)
    assert torch.isfinite(losses).all()
    documents = torch.tensor([p["document_ids"] for p in packs])
    packed = [losses[b][documents[b] == d] for b in range(len(packs)) for d in range(int(documents[b].max()) + 1)]
    # Each token's loss to 1e-5, and so each sample's summed loss to 1e-5 relative (fp32 sums of ~30 terms).
    torch.testing.assert_close(torch.cat(packed), torch.cat(alone), rtol=0, atol=1e-5)
    sums = [torch.stack([loss.sum() for loss in per_sample]) for per_sample in (packed, alone)]
    torch.testing.assert_close(*sums, rtol=1e-5, atol=0)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(len(s["tokens"]) - 1 for s in unpacked)


def test_collate_pads_to_longest_and_shifts_labels():
    batch = [{"tokens": [1, 2, 3], "labels": [-100, 2, 3]}, {"tokens": [4, 5], "labels": [4, 5]}]
    out = padded_collate(batch, pad_id=0)
    assert out["tokens"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert out["labels"].tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert padded_collate(batch, pad_id=0, pad_to_multiple_of=8)["tokens"].shape == torch.Size([2, 8])


# --- bad data ----------------------------------------------------------------------------------


def test_missing_column_names_file_row_and_column(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"d.json, row 1: column 'output' is missing"):
        alpaca_dataset(tokenizer, source)


@pytest.mark.parametrize("suffix, where", [(".json", "row 1"), (".jsonl", "line 2"), (".parquet", "row 1")])
def test_null_value_is_located_by_line_or_row(tmp_path, tokenizer, suffix, where):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "output": None}]
    with pytest.raises(DataError, match=rf"d{suffix}, {where}: column 'output' is missing"):
        alpaca_dataset(tokenizer, write_table(tmp_path / f"d{suffix}", rows))


def test_short_csv_row_is_located_by_the_line_it_starts_on(tmp_path, tokenizer):
    (tmp_path / "d.csv").write_text('instruction,input,output\n"two\nlines",,b\nc,\n')
    with pytest.raises(DataError, match=r"d.csv, line 4: column 'output' is missing"):
        alpaca_dataset(tokenizer, str(tmp_path / "d.csv"))


def test_non_string_value_names_its_column(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.jsonl", [{"instruction": "a", "output": 5}])
    with pytest.raises(DataError, match=r"d.jsonl, line 1: column 'output' must be a string, got int"):
        alpaca_dataset(tokenizer, source)


def test_malformed_jsonl_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl, line 2: malformed JSON"):
        alpaca_dataset(tokenizer, str(path))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt", ".parquet"])
def test_empty_file_is_named(tmp_path, tokenizer, suffix):
    (tmp_path / f"d{suffix}").write_text("")
    with pytest.raises(DataError, match=rf"d{suffix} is empty"):
        text_completion_dataset(tokenizer, str(tmp_path / f"d{suffix}"), max_seq_len=64)


def test_json_object_holding_the_rows_gets_a_hint(tmp_path, tokenizer):
    source = write_table(tmp_path / "d.json", {"data": ALPACA_ROWS})
    with pytest.raises(DataError, match=r"rows seem to be under 'data': make that list the file's top-level value"):
        alpaca_dataset(tokenizer, source)


def test_unknown_format_lists_the_accepted_ones(tmp_path, tokenizer):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unknown data format '.xlsx'; accepted: .json, .jsonl, .csv, .parquet, .txt"):
        alpaca_dataset(tokenizer, str(tmp_path / "d.xlsx"))


def test_missing_local_file_is_not_mistaken_for_a_hub_name(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        alpaca_dataset(tokenizer, "data/train.jsonl")


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"role": "user", "content": "hi"}], r"column 'messages' has no assistant turn"),
        ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}],
         r"column 'messages', turn 0: 'content' must be a string, got list"),
        ([{"role": "robot", "content": "hi"}], r"column 'messages', turn 0: role 'robot' is not one of"),
        ([{"role": "user"}], r"column 'messages', turn 0: expected an object with 'role' and 'content'"),
        ([], r"column 'messages' must be a non-empty list"),
    ],
)
def test_bad_conversation_names_line_column_and_turn(tmp_path, tokenizer, conversation, message):
    source = write_table(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": conversation}])
    with pytest.raises(DataError, match=rf"c.jsonl, line 2: {message}"):
        chat_dataset(tokenizer, source)
