"""Real chat templates (tests/fixtures/chat_templates, sources in its README) rendered by
hf_tokenizer: ids equal transformers' apply_chat_template on the same tokenizer.json, and the loss
mask trains exactly each assistant turn as its template writes it (content and end-of-turn text).

Templates whose rendering of a conversation's first turns is not a prefix of their rendering of
the whole are refused for those conversations, naming the template and the turn; the test pins
which ones and why. The Llama 3.1 Instruct template is also compared with the hand-written Llama 3
layout (llama3_tokenizer), which it equals but for the system block it always writes.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from hf_tokenizer_helpers import write_tokenizer_folder
from tunelite.errors import DataError
from tunelite.tokenizers import (
    Message,
    hf_tokenizer,
    llama3_tokenizer,
    messages_from_dicts,
    train_bpe_ranks,
    write_tiktoken_bpe,
)

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital. "},
    {"role": "user", "content": " Write a haiku about the sea"},
    {"role": "assistant", "content": "waves fold into foam,\nsalt wind carries gull voices"},
]
CONVERSATIONS = {
    "single turn": TURNS[:2],
    "system prompt": [SYSTEM, *TURNS[:2]],
    "multi-turn": TURNS,
    "multi-turn with system prompt": [SYSTEM, *TURNS],
}


@dataclass
class Family:
    """A fixture template, the tokens its model's folder defines, and what an assistant turn renders as."""

    template: str
    special: list[str]
    config: dict
    turn: str  # an assistant turn as the template writes it: {content} / {stripped} / {last} placeholders
    style: str = "byte_level"
    bos: str | None = None
    plain_added: list[str] = field(default_factory=list)
    last_tail: str = ""  # what the template writes after the final turn (Phi's eos)
    refused: dict[str, str] = field(default_factory=dict)  # conversation -> part of the error


FAMILIES = {
    "llama3.1": Family(
        "meta-llama--Llama-3.1-8B-Instruct",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>", "<|python_tag|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "{stripped}<|eot_id|>", bos="<|begin_of_text|>",
    ),
    "qwen2.5": Family(
        "Qwen--Qwen2.5-7B-Instruct", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "{content}<|im_end|>\n",
    ),
    "qwen3": Family(
        "Qwen--Qwen3-0.6B", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "<think>\n\n</think>\n\n{content}<|im_end|>\n", plain_added=["<think>", "</think>"],
        # The last reply gets an empty think block, earlier ones none: turn 1 renders differently
        # once a later user turn follows.
        refused={"multi-turn": "turn 1 (assistant)", "multi-turn with system prompt": "turn 2 (assistant)"},
    ),
    "mistral-v0.3": Family(
        "mistralai--Mistral-7B-Instruct-v0.3",
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
         "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, " {stripped}</s>", style="metaspace",
        bos="<s>",
        # The system prompt goes into the last user turn only, so the user turn after it renders
        # differently once the reply follows.
        refused={"system prompt": "turn 1 (user)", "multi-turn with system prompt": "turn 1 (user)"},
    ),
    "phi3": Family(
        "microsoft--Phi-3-mini-4k-instruct",
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}, "{content}<|end|>\n",
        style="metaspace", last_tail="<|endoftext|>",
    ),
    "phi4-mini": Family(
        "microsoft--Phi-4-mini-instruct",
        ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>", "<|tool|>", "<|/tool|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, "{content}<|end|>", last_tail="<|endoftext|>",
    ),
    "gemma2": Family(
        "google--gemma-2-2b-it", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        "{stripped}<end_of_turn>\n", style="metaspace", bos="<bos>",
        refused={"system prompt": "System role not supported", "multi-turn with system prompt": "System role"},
    ),
    "gemma3": Family(
        "google--gemma-3-it", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        "{stripped}<end_of_turn>\n", style="metaspace", bos="<bos>",
    ),
    "smollm2": Family(
        "HuggingFaceTB--SmolLM2-135M-Instruct", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}, "{content}<|im_end|>\n",
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    spec = FAMILIES[request.param]
    template = (TEMPLATES / f"{spec.template}.jinja").read_text(encoding="utf-8")
    folder = write_tokenizer_folder(
        tmp_path_factory.mktemp(request.param), spec.special, spec.config, style=spec.style,
        plain_added=spec.plain_added, bos=spec.bos, chat_template=template,
    )
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), chat_template=template,
        **{key: value for key, value in spec.config.items() if value is not None},
    )
    return spec, hf_tokenizer(str(folder)), reference


def _trained_runs(tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """The text of each maximal run of trained tokens."""
    runs: list[list[int]] = []
    for i, (token, masked) in enumerate(zip(ids, mask)):
        if not masked:
            if i == 0 or mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_template_ids_equal_transformers_and_mask_trains_exactly_the_assistant_turns(family, conversation: str):
    spec, tokenizer, reference = family
    dicts = CONVERSATIONS[conversation]
    messages = messages_from_dicts(dicts)
    if conversation in spec.refused:
        with pytest.raises(DataError, match=re.escape(spec.refused[conversation])) as refusal:
            tokenizer.tokenize_messages(messages)
        assert tokenizer.chat_template.name in str(refusal.value)  # names the file it came from
        return
    ids, mask = tokenizer.tokenize_messages(messages)
    assert ids == reference.apply_chat_template(dicts, tokenize=True, return_dict=False)
    replies = [m["content"] for m in dicts if m["role"] == "assistant"]
    expected = [spec.turn.format(content=r, stripped=r.strip()) for r in replies]
    expected[-1] += spec.last_tail
    assert _trained_runs(tokenizer, ids, mask) == expected


def test_generation_prompt_equals_transformers_and_continues_a_partial_reply(family):
    spec, tokenizer, reference = family
    dicts = CONVERSATIONS["single turn"][:1]
    prompt, _ = tokenizer.tokenize_messages([*messages_from_dicts(dicts), Message("assistant", "")],
                                            add_end_tokens=False)
    assert prompt == reference.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True, return_dict=False)
    started, mask = tokenizer.tokenize_messages([*messages_from_dicts(dicts), Message("assistant", "Paris")],
                                                add_end_tokens=False)
    decoded = tokenizer.decode(started, skip_special_tokens=False)
    assert decoded == tokenizer.decode(prompt, skip_special_tokens=False) + "Paris"
    assert _trained_runs(tokenizer, started, mask) == ["Paris"]


def test_train_on_all_trains_every_token_of_the_conversation(family):
    spec, tokenizer, _ = family
    _, mask = tokenizer.tokenize_messages(messages_from_dicts(CONVERSATIONS["single turn"], train_on="all"))
    assert not any(mask)


def test_llama31_template_is_the_handwritten_layout_plus_its_knowledge_cutoff_system_block(tmp_path: Path):
    """The hand-written Llama 3 layout as oracle, on the same BPE (Meta's format converted to a
    tokenizer.json by transformers' TikTokenConverter). The Llama 3.1 Instruct template differs in
    exactly three ways, which this pins: it always writes a system block, starting "Cutting
    Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" (with no system prompt the block
    is that text alone, its blank line kept); it writes no final <|end_of_text|>; and its mask does
    not train the assistant headers, which the hand-written layout trains."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tunelite.tokenizers import LLAMA3_PATTERN, llama3_special_tokens

    bpe = tmp_path / "original" / "tokenizer.model"
    bpe.parent.mkdir()
    ranks = train_bpe_ranks(" ".join(m["content"] for m in [SYSTEM, *TURNS]) * 20, 300)
    write_tiktoken_bpe(ranks, bpe)
    converted = TikTokenConverter(vocab_file=str(bpe), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=list(llama3_special_tokens(len(ranks)))).converted()
    converted.save(str(tmp_path / "tokenizer.json"))
    template = (TEMPLATES / "meta-llama--Llama-3.1-8B-Instruct.jinja").read_text(encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": template})
    )
    ours, meta = hf_tokenizer(str(tmp_path)), llama3_tokenizer(str(bpe))
    cutoff = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    header = meta._header("assistant")
    for dicts in (TURNS, [SYSTEM, *TURNS]):
        system, turns = (dicts[0]["content"], dicts[1:]) if dicts[0]["role"] == "system" else ("", dicts)
        ids, mask = ours.tokenize_messages(messages_from_dicts(dicts))
        oracle_ids, oracle_mask = meta.tokenize_messages(
            messages_from_dicts([{"role": "system", "content": cutoff + system}, *turns])
        )
        assert oracle_ids[-1] == meta.eos_id
        oracle_ids, oracle_mask = oracle_ids[:-1], oracle_mask[:-1]
        if not system:  # the hand-written layout strips the block's trailing blank line
            blank = meta.encode("\n\n", add_bos=False, add_eos=False)
            end = oracle_ids.index(meta.eot_id)
            oracle_ids[end:end] = blank
            oracle_mask[end:end] = [True] * len(blank)
        assert ids == oracle_ids
        headers = {i + j for i in range(len(ids)) if ids[i:i + len(header)] == header for j in range(len(header))}
        assert len(headers) == 2 * len(header)
        assert [i for i, (a, b) in enumerate(zip(mask, oracle_mask)) if a != b] == sorted(headers)
