"""hf_tokenizer and auto_tokenizer on folders the tests write: BOS/EOS/pad/stop ids as the folder
defines them, encoding as the model's own tokenizer does, the data pipeline and generation on top,
and a clear refusal for every folder that cannot be used."""

import json
from pathlib import Path

import pytest
import sentencepiece
from transformers import PreTrainedTokenizerFast

from hf_tokenizer_helpers import CORPUS, write_tokenizer_folder
from tunelite.config import asset_path
from tunelite.data import chat_dataset, text_completion_dataset
from tunelite.errors import ConfigError, DataError
from tunelite.generation.chat import chat_prompt
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.tokenizers import (
    HFTokenizer,
    Llama2Tokenizer,
    Llama3Tokenizer,
    Message,
    auto_tokenizer,
    hf_tokenizer,
    messages_from_dicts,
)

CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                 "<|eot_id|>", "<|finetune_right_pad_id|>"]
TEXT = "Hello, how are you today? <|im_end|> <|eot_id|> é 東京"


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No BOS; eos <|im_end|>; replies also end on <|endoftext|> (generation_config), as Qwen2.5 Instruct."""
    return write_tokenizer_folder(
        tmp_path_factory.mktemp("qwen"), QWEN_SPECIAL,
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        generation_config={"eos_token_id": [2, 0]}, chat_template=CHATML,
    )


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BOS added by the post-processor, no pad token, AddedToken dicts, three stop ids: Llama 3.1 Instruct."""
    return write_tokenizer_folder(
        tmp_path_factory.mktemp("llama"), LLAMA_SPECIAL,
        {"bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"}, "eos_token": "<|eot_id|>"},
        bos="<|begin_of_text|>", generation_config={"bos_token_id": 0, "eos_token_id": [1, 4, 5]},
    )


def test_special_ids_come_from_tokenizer_config_and_stop_tokens_from_generation_config(qwen_folder, llama_folder):
    qwen, llama = hf_tokenizer(str(qwen_folder)), hf_tokenizer(str(llama_folder / "tokenizer.json"))
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.stop_tokens) == (None, 2, 0, [2, 0])
    assert (llama.bos_id, llama.eos_id, llama.stop_tokens) == (0, 5, [5, 1, 4])
    assert llama.pad_id == llama.eos_id  # no pad token: padding never reaches the loss
    assert qwen.vocab_size == PreTrainedTokenizerFast(tokenizer_file=str(qwen_folder / "tokenizer.json")).vocab_size


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_encode_adds_bos_exactly_as_the_models_own_tokenizer(name, qwen_folder, llama_folder):
    folder = {"qwen": qwen_folder, "llama": llama_folder}[name]
    ours = hf_tokenizer(str(folder))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    plain = "Hello, how are you today?"
    assert ours.encode(plain, add_bos=True, add_eos=False) == reference(plain)["input_ids"]
    assert ours.encode(plain, add_bos=False, add_eos=False) == reference(plain, add_special_tokens=False)["input_ids"]
    assert ours.encode(plain, add_bos=False, add_eos=True)[-1] == ours.eos_id


def test_special_token_strings_in_plain_text_stay_text(qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder))
    ids = tokenizer.encode(TEXT, add_bos=False, add_eos=False)
    assert tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == TEXT


def test_decode_drops_special_tokens_unless_asked(qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder))
    ids, _ = tokenizer.tokenize_messages([Message("user", "Hello"), Message("assistant", "I am fine")])
    rendered = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nI am fine<|im_end|>\n"
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert "<|im_start|>" not in tokenizer.decode(ids)


def test_chat_dataset_with_a_folder_tokenizer_trains_only_the_replies(tmp_path, qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "I am fine"}, {"role": "user", "content": "And you?"},
            {"role": "assistant", "content": "Thank you"}]
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": chat}) + "\n")
    sample = chat_dataset(tokenizer, str(source))[0]
    labels = [label for label in sample["labels"] if label != IGNORE_INDEX]
    trained = tokenizer.decode(labels, skip_special_tokens=False)
    assert trained == "I am fine<|im_end|>\nThank you<|im_end|>\n"


def test_text_completion_with_a_tokenizer_that_adds_no_bos(tmp_path, qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder), max_seq_len=64)
    source = tmp_path / "doc.txt"
    source.write_text("Hello, how are you today?")
    tokens = text_completion_dataset(tokenizer, str(source))[0]["tokens"]
    assert tokens == tokenizer.encode("Hello, how are you today?", add_bos=False, add_eos=True)


def test_generation_prompt_is_the_templates_generation_prompt(qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder))
    reference = PreTrainedTokenizerFast(tokenizer_file=str(qwen_folder / "tokenizer.json"), chat_template=CHATML)
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "I am fine"},
            {"role": "user", "content": "And you?"}]
    assert chat_prompt(tokenizer, messages_from_dicts(chat)) == reference.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_long_conversations_are_cut_to_max_seq_len_on_an_untrained_eos(qwen_folder):
    tokenizer = hf_tokenizer(str(qwen_folder), max_seq_len=12)
    ids, mask = tokenizer.tokenize_messages(messages_from_dicts([
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": CORPUS[:200]}]))
    assert len(ids) == 12 and ids[-1] == tokenizer.eos_id and mask[-1]


def test_template_file_order_and_override(tmp_path, qwen_folder):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen_folder / name).read_bytes())
    assert hf_tokenizer(str(folder)).chat_template.name == str(folder / "tokenizer_config.json")
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    assert hf_tokenizer(str(folder)).chat_template.name == str(folder / "chat_template.json")
    (folder / "chat_template.jinja").write_text(CHATML)
    assert hf_tokenizer(str(folder)).chat_template.name == str(folder / "chat_template.jinja")
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}<|im_end|>{% endfor %}")
    tokenizer = hf_tokenizer(str(folder), chat_template=str(other))
    ids, _ = tokenizer.tokenize_messages([Message("user", "Hello"), Message("assistant", "Hi")])
    assert tokenizer.decode(ids, skip_special_tokens=False) == "[user]Hello<|im_end|>[assistant]Hi<|im_end|>"


def test_generation_tags_of_training_templates_render_their_body(tmp_path, qwen_folder):
    tagged = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    folder = write_tokenizer_folder(tmp_path, QWEN_SPECIAL, {"eos_token": "<|im_end|>", "chat_template": tagged})
    chat = [Message("user", "Hello"), Message("assistant", "Hi")]
    assert hf_tokenizer(str(folder)).tokenize_messages(chat) == hf_tokenizer(str(qwen_folder)).tokenize_messages(chat)


def test_named_templates_use_the_default_one(tmp_path, qwen_folder):
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
    folder = write_tokenizer_folder(tmp_path, QWEN_SPECIAL, {"eos_token": "<|im_end|>", "chat_template": named})
    chat = [Message("user", "Hello"), Message("assistant", "Hi")]
    assert hf_tokenizer(str(folder)).tokenize_messages(chat) == hf_tokenizer(str(qwen_folder)).tokenize_messages(chat)


# --- auto_tokenizer ------------------------------------------------------------------------------


def test_auto_tokenizer_prefers_tokenizer_json_and_reads_metas_files_otherwise(tmp_path, llama_folder):
    assert isinstance(auto_tokenizer(str(llama_folder)), HFTokenizer)
    meta = tmp_path / "meta"
    (meta / "original").mkdir(parents=True)
    (meta / "original" / "tokenizer.model").write_bytes(Path(asset_path("tiny/tokenizer.model")).read_bytes())
    assert isinstance(auto_tokenizer(str(meta), max_seq_len=32), Llama3Tokenizer)
    (tmp_path / "corpus.txt").write_text(CORPUS.replace(". ", ".\n") * 3)
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120, minloglevel=2
    )
    assert isinstance(auto_tokenizer(str(tmp_path / "tokenizer.model")), Llama2Tokenizer)


# --- refusals --------------------------------------------------------------------------------------


def test_a_folder_with_no_tokenizer_is_refused_naming_it_and_the_files_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no tokenizer") as error:
        auto_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert all(name in str(error.value) for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"))
    with pytest.raises(ConfigError, match=f"{tmp_path} has no tokenizer.json"):
        hf_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        auto_tokenizer(str(tmp_path / "missing"))


def test_bad_folders_are_refused_with_the_file_and_the_fix(tmp_path, qwen_folder):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": {"type": "NotAModel"}}')
    with pytest.raises(ConfigError, match=f"cannot read {broken / 'tokenizer.json'}"):
        hf_tokenizer(str(broken))

    def folder_with(config: dict) -> str:
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "tokenizer.json").write_bytes((qwen_folder / "tokenizer.json").read_bytes())
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return str(folder)

    with pytest.raises(ConfigError, match="eos_token '<\\|eot_id\\|>' is not in the vocabulary"):
        hf_tokenizer(folder_with({"eos_token": "<|eot_id|>"}))
    with pytest.raises(ConfigError, match="names no end-of-sequence token"):
        hf_tokenizer(folder_with({}))
    with pytest.raises(ConfigError, match="tokenizer_config.json: line 1: "):
        hf_tokenizer(folder_with({"eos_token": "<|im_end|>", "chat_template": "{% for m in messages %}"}))
    base = hf_tokenizer(folder_with({"eos_token": "<|im_end|>"}))
    with pytest.raises(ConfigError, match="has no chat template .*tokenizer.chat_template="):
        base.tokenize_messages([Message("user", "Hello")])
    refusing = hf_tokenizer(folder_with({"eos_token": "<|im_end|>",
                                         "chat_template": "{{ raise_exception('no system') }}"}))
    with pytest.raises(DataError, match="refused the conversation: no system"):
        refusing.tokenize_messages([Message("user", "Hello")])


def test_templates_run_sandboxed(tmp_path, qwen_folder):
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    folder = write_tokenizer_folder(tmp_path, QWEN_SPECIAL, {"eos_token": "<|im_end|>", "chat_template": escape})
    with pytest.raises(DataError, match="refused the conversation"):
        hf_tokenizer(str(folder)).tokenize_messages([Message("user", "Hello")])
