"""Tokenizers: round trips, Meta's special-token ids, both chat layouts, loss masks, long inputs.

The tests build their own small BPE and SentencePiece files from text they write, so they
need no download; the SentencePiece model uses Llama 2's settings (identity normalization,
kept whitespace, byte fallback) so that whitespace behaves as in Meta's model.
"""

import importlib.util
import json
import random
import time
from importlib.resources import files
from pathlib import Path

import pytest
import sentencepiece

from tunelite.errors import ConfigError, DataError
from tunelite.tokenizers import (
    Message,
    llama2_tokenizer,
    llama3_special_tokens,
    llama3_tokenizer,
    messages_from_dicts,
    train_bpe_ranks,
    write_tiktoken_bpe,
)
from tunelite.tokenizers.llama3 import _split_for_bpe

MULTILINGUAL = (
    "Hello, world! Bonjour à tous, ça va ? Grüße aus Köln, Straße 12. "
    "¿Dónde está la estación? Привет, мир. 東京タワーは高い。 "
    "Emoji: 😀🎉 👩‍👩‍👧 ☀️\n\ttabs  and  spaces"
)
SPECIAL_STRINGS = "<|begin_of_text|> <|eot_id|> <|start_header_id|>user<|end_header_id|> <s> </s>"
WORDS = (
    "the of and to in is was for on that with as it by at from this be are which or an "
    "water capital city number river paris berlin madrid answer question sentence write "
    "le la les et est une des que pour dans der die das und ist nicht ein eine mit "
    "el los las es por con para una del café naïve größer año niño über façade"
).split()
CHAT = [
    {"role": "system", "content": "You are terse.\n"},
    {"role": "user", "content": "  What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5.  "},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]
REPO = Path(__file__).resolve().parents[1]


def _random_words(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    length = 0
    while length < n_chars:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:n_chars]


@pytest.fixture(scope="module")
def corpus() -> str:
    return _random_words(20_000, seed=0) + "\n" + MULTILINGUAL


@pytest.fixture(scope="module")
def llama3_path(tmp_path_factory: pytest.TempPathFactory, corpus: str) -> str:
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    write_tiktoken_bpe(train_bpe_ranks(corpus, 400), path)
    return str(path)


@pytest.fixture(scope="module")
def llama2_path(tmp_path_factory: pytest.TempPathFactory, corpus: str) -> str:
    folder = tmp_path_factory.mktemp("llama2")
    text = folder / "corpus.txt"
    text.write_text(corpus.replace(". ", ".\n"), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=450,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
    )
    return str(folder / "tokenizer.model")


@pytest.fixture(params=["llama2", "llama3"])
def tokenizer(request: pytest.FixtureRequest, llama2_path: str, llama3_path: str):
    if request.param == "llama2":
        return llama2_tokenizer(llama2_path)
    return llama3_tokenizer(llama3_path)


def test_multilingual_text_and_emoji_round_trip(tokenizer) -> None:
    ids = tokenizer.encode(MULTILINGUAL)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == MULTILINGUAL
    assert tokenizer.encode(MULTILINGUAL, add_bos=False, add_eos=False) == ids[1:-1]


def test_special_token_strings_in_text_stay_plain_text(tokenizer) -> None:
    ids = tokenizer.encode(SPECIAL_STRINGS, add_bos=False, add_eos=False)
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, *tokenizer.stop_tokens}
    if hasattr(tokenizer, "special_tokens"):
        special |= set(tokenizer.special_tokens.values())
    assert not special & set(ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == SPECIAL_STRINGS


def test_llama3_special_ids_follow_meta_layout_after_the_base_vocabulary(llama3_path: str) -> None:
    tok = llama3_tokenizer(llama3_path)
    n = 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 4)
    assert (tok.start_header_id, tok.end_header_id, tok.eom_id, tok.eot_id) == (
        n + 6,
        n + 7,
        n + 8,
        n + 9,
    )
    assert tok.stop_tokens == [n + 1, n + 9, n + 8]
    assert tok.vocab_size == n + 256
    assert tok.special_tokens["<|python_tag|>"] == n + 10
    assert tok.special_tokens["<|reserved_special_token_247|>"] == n + 255
    for name, token_id in tok.special_tokens.items():
        assert tok.decode([token_id], skip_special_tokens=False) == name
        assert tok.decode([token_id]) == ""


def test_llama3_special_ids_match_meta_ids_for_the_full_vocabulary() -> None:
    ids = llama3_special_tokens(128_000)
    assert len(ids) == 256 and sorted(ids.values()) == list(range(128_000, 128_256))
    assert ids["<|begin_of_text|>"] == 128_000
    assert ids["<|end_of_text|>"] == 128_001
    assert ids["<|finetune_right_pad_id|>"] == 128_004
    assert ids["<|start_header_id|>"] == 128_006
    assert ids["<|end_header_id|>"] == 128_007
    assert ids["<|eom_id|>"] == 128_008
    assert ids["<|eot_id|>"] == 128_009
    assert ids["<|python_tag|>"] == 128_010
    assert ids["<|reserved_special_token_3|>"] == 128_011


def test_llama3_chat_layout_is_meta_header_eot_format_with_trimmed_contents(
    llama3_path: str,
) -> None:
    tok = llama3_tokenizer(llama3_path)
    ids, mask = tok.tokenize_messages(messages_from_dicts(CHAT))
    assert len(ids) == len(mask)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 + 4?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4 + 4 = 8.<|eot_id|>"
        "<|end_of_text|>"
    )


def test_llama3_mask_excludes_exactly_the_non_assistant_turns(llama3_path: str) -> None:
    tok = llama3_tokenizer(llama3_path)
    ids, mask = tok.tokenize_messages(messages_from_dicts(CHAT, train_on="assistant"))
    excluded = [i for i, m in zip(ids, mask) if m]
    trained = [i for i, m in zip(ids, mask) if not m]
    assert tok.decode(excluded, skip_special_tokens=False) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 4 + 4?<|eot_id|>"
    )
    assert tok.decode(trained, skip_special_tokens=False) == (
        "<|start_header_id|>assistant<|end_header_id|>\n\n2 + 3 = 5.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4 + 4 = 8.<|eot_id|>"
        "<|end_of_text|>"
    )
    all_ids, all_mask = tok.tokenize_messages(messages_from_dicts(CHAT, train_on="all"))
    assert all_ids == ids and not any(all_mask)


def test_llama3_without_end_tokens_ends_in_the_assistant_header_for_generation(
    llama3_path: str,
) -> None:
    tok = llama3_tokenizer(llama3_path)
    prompt = messages_from_dicts(CHAT[:2] + [{"role": "assistant", "content": ""}])
    ids, _ = tok.tokenize_messages(prompt, add_end_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False).endswith(
        "What is 2 + 3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_llama3_truncation_keeps_max_seq_len_and_ends_on_an_untrained_eos(
    llama3_path: str,
) -> None:
    tok = llama3_tokenizer(llama3_path, max_seq_len=30)
    full, _ = llama3_tokenizer(llama3_path).tokenize_messages(messages_from_dicts(CHAT))
    ids, mask = tok.tokenize_messages(messages_from_dicts(CHAT))
    assert len(full) > 30 and len(ids) == len(mask) == 30
    assert ids[:-1] == full[:29] and ids[-1] == tok.eos_id and mask[-1] is True


def _meta_llama2_dialog(
    sp: sentencepiece.SentencePieceProcessor, dialog: list[dict]
) -> list[int]:
    """Meta's llama `chat_completion` (generation.py), transcribed as the reference."""
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        merged = b_sys + dialog[0]["content"] + e_sys + dialog[1]["content"]
        dialog = [{"role": "user", "content": merged}] + dialog[2:]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{b_inst} {prompt['content'].strip()} {e_inst} {answer['content'].strip()} "
        ids += sp.encode(text, add_bos=True, add_eos=True)
    if len(dialog) % 2:
        ids += sp.encode(f"{b_inst} {dialog[-1]['content'].strip()} {e_inst}", add_bos=True)
    return ids


@pytest.mark.parametrize("turns", [CHAT, CHAT[1:], CHAT[:4]], ids=["system", "no-system", "open"])
def test_llama2_chat_ids_equal_meta_chat_completion(llama2_path: str, turns: list[dict]) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=llama2_path)
    ids, mask = llama2_tokenizer(llama2_path).tokenize_messages(messages_from_dicts(turns))
    assert ids == _meta_llama2_dialog(sp, turns)
    assert len(mask) == len(ids)


def test_llama2_chat_decodes_to_the_inst_sys_layout(llama2_path: str) -> None:
    tok = llama2_tokenizer(llama2_path)
    ids, _ = tok.tokenize_messages(messages_from_dicts(CHAT))
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n\n<</SYS>>\n\n  What is 2 + 3? [/INST] 2 + 3 = 5. </s>"
        "<s>[INST] And 4 + 4? [/INST] 4 + 4 = 8. </s>"
    )


def test_llama2_mask_excludes_each_turns_prompt_and_trains_replies_with_eos(
    llama2_path: str,
) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=llama2_path)
    tok = llama2_tokenizer(llama2_path)
    ids, mask = tok.tokenize_messages(messages_from_dicts(CHAT))
    system_prompt = "[INST] <<SYS>>\nYou are terse.\n\n<</SYS>>\n\n  What is 2 + 3? [/INST]"
    expected: list[bool] = []
    turns = [(system_prompt, "2 + 3 = 5. "), ("[INST] And 4 + 4? [/INST]", "4 + 4 = 8. ")]
    for prompt, reply in turns:
        expected += [True] * (1 + len(sp.encode(prompt)))
        expected += [False] * (len(sp.encode(reply)) + 1)
    assert mask == expected
    assert [i for i, m in zip(ids, mask) if not m].count(tok.eos_id) == 2
    _, all_mask = tok.tokenize_messages(messages_from_dicts(CHAT, train_on="all"))
    assert not any(all_mask)


def test_llama2_rejects_roles_that_do_not_alternate(llama2_path: str) -> None:
    tok = llama2_tokenizer(llama2_path)
    with pytest.raises(DataError, match="alternate"):
        tok.tokenize_messages(messages_from_dicts(CHAT[1:2] + CHAT[3:4]))


@pytest.mark.parametrize("kind", ["random words", "one repeated character"])
def test_one_megabyte_encodes_in_seconds_and_round_trips(tokenizer, kind: str) -> None:
    text = _random_words(1_000_000, seed=1) if kind == "random words" else "a" * 1_000_000
    start = time.perf_counter()
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"encoding 1 MB took {elapsed:.1f} s"
    assert tokenizer.decode(ids) == text


def test_long_runs_are_cut_where_meta_cuts_them_without_losing_text() -> None:
    # A cut falls before the 25,001st char of a run of spaces or non-spaces, so the x run is
    # cut at 25,000 and 50,000 and the space run (from 60,001) at 85,001, as in Meta's code.
    text = "x" * 60_001 + " " * 30_000 + "tail"
    pieces = list(_split_for_bpe(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 25_000, 35_001, 5_004]


def test_shipped_tiny_tokenizer_has_768_ids_and_round_trips_the_sample_data() -> None:
    tiny = files("tunelite.assets") / "tiny"
    tok = llama3_tokenizer(str(tiny / "tokenizer.model"))
    assert (tok.base_vocab_size, tok.vocab_size) == (512, 768)
    rows = json.loads((tiny / "alpaca_sample.json").read_text(encoding="utf-8"))
    for row in rows:
        for text in row.values():
            assert tok.decode(tok.encode(text)) == text


def test_shipped_tiny_tokenizer_is_what_the_script_generates_from_the_sample_data(
    tmp_path: Path,
) -> None:
    path = REPO / "scripts" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = json.loads((script.TINY_ASSETS / "alpaca_sample.json").read_text(encoding="utf-8"))
    ranks = train_bpe_ranks(script.sample_text(rows), script.BASE_VOCAB_SIZE)
    write_tiktoken_bpe(ranks, tmp_path / "tokenizer.model")
    shipped = (script.TINY_ASSETS / "tokenizer.model").read_bytes()
    assert (tmp_path / "tokenizer.model").read_bytes() == shipped, (
        "tunelite/assets/tiny/tokenizer.model is stale: run python scripts/make_tiny_tokenizer.py"
    )


def test_bpe_training_starts_with_the_256_bytes_and_has_exactly_the_asked_ranks(
    corpus: str,
) -> None:
    ranks = train_bpe_ranks(corpus, 300)
    assert sorted(ranks.values()) == list(range(300))
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert train_bpe_ranks(corpus, 300) == ranks


def test_llama3_reads_a_rewritten_file_rather_than_a_cached_copy(
    tmp_path: Path, corpus: str
) -> None:
    path = tmp_path / "tokenizer.model"
    write_tiktoken_bpe(train_bpe_ranks(corpus, 300), path)
    assert llama3_tokenizer(str(path)).vocab_size == 300 + 256
    write_tiktoken_bpe(train_bpe_ranks(corpus, 310), path)
    assert llama3_tokenizer(str(path)).vocab_size == 310 + 256


def test_llama3_builder_on_a_sentencepiece_file_names_llama2_builder(llama2_path: str) -> None:
    with pytest.raises(ConfigError, match="llama2_tokenizer") as error:
        llama3_tokenizer(llama2_path)
    assert llama2_path in str(error.value)


def test_llama2_builder_on_a_tiktoken_file_names_llama3_builder(llama3_path: str) -> None:
    with pytest.raises(ConfigError, match="llama3_tokenizer") as error:
        llama2_tokenizer(llama3_path)
    assert llama3_path in str(error.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"model": {"type": "BPE"}}\n', "tokenizer.json"),
        (b"YQ== 0\nYg== 2\n", "ranks are not 0..N-1"),
        (b"YQ== 0\n", "single bytes have no rank"),
    ],
    ids=["hf-json", "rank-gap", "missing-bytes"],
)
def test_llama3_builder_explains_a_malformed_file(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=problem) as error:
        llama3_tokenizer(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("builder", [llama2_tokenizer, llama3_tokenizer])
def test_missing_tokenizer_file_raises_config_error_naming_it(tmp_path: Path, builder) -> None:
    path = str(tmp_path / "nowhere" / "tokenizer.model")
    with pytest.raises(ConfigError, match="does not exist") as error:
        builder(path)
    assert path in str(error.value)


def test_train_on_policy_sets_which_messages_are_masked() -> None:
    assistant_only = messages_from_dicts(CHAT, train_on="assistant")
    assert [m.masked for m in assistant_only] == [True, True, False, True, False]
    assert not any(m.masked for m in messages_from_dicts(CHAT, train_on="all"))
    assert assistant_only[1] == Message(role="user", content="  What is 2 + 3?", masked=True)


def test_bad_roles_and_policies_are_rejected() -> None:
    with pytest.raises(DataError, match="'bot'"):
        messages_from_dicts([{"role": "bot", "content": "hi"}])
    with pytest.raises(DataError, match="content"):
        messages_from_dicts([{"role": "user"}])
    with pytest.raises(ConfigError, match="train_on"):
        messages_from_dicts(CHAT, train_on="prompts")
