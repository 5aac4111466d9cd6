"""Any Hugging Face model's tokenizer, read from its folder with the `tokenizers` library alone.

`tokenizer.json` holds the vocabulary, the added tokens and what the tokenizer adds around a text
(its post-processor: Llama and Gemma add a BOS, Qwen adds nothing); `tokenizer_config.json` names
the special tokens; `generation_config.json` lists the ids that end a reply (Llama 3.1 Instruct
stops on <|eot_id|> and <|eom_id|> as well as <|end_of_text|>); the chat template comes from the
folder too (see chat_template.py). transformers is never imported.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tunelite.errors import ConfigError, DataError
from tunelite.files import MAX_TOKENIZER_BYTES, check_size
from tunelite.tokenizers.chat_template import TEMPLATE_FILES, ChatTemplate, read_chat_template, read_json
from tunelite.tokenizers.messages import Message, truncate

TOKENIZER_FILE = "tokenizer.json"
# The special tokens transformers hands a chat template, under these names, when they are set.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def locate_tokenizer_json(path: str | Path, builder: str) -> Path:
    """The tokenizer.json a builder was pointed at: the file itself or the one in a model folder."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise ConfigError(
            f"{builder}: {where}; pass a Hugging Face model folder (or its tokenizer.json). Meta's "
            "original/tokenizer.model is read by tunelite.tokenizers.auto_tokenizer or llama3_tokenizer"
        )
    return check_size(file, MAX_TOKENIZER_BYTES, "tokenizer file", ConfigError)


def _token_content(value: Any, key: str, source: Path) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"{source}: {key} must be a string or an object with a 'content' string, got {value!r}")


class HFTokenizer:
    """A model folder's tokenizer.json, special tokens and chat template, with loss masks per turn."""

    def __init__(
        self, path: str | Path, max_seq_len: int | None = None, chat_template: str | Path | None = None
    ) -> None:
        file = locate_tokenizer_json(path, "hf_tokenizer")
        folder = file.parent
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise ConfigError(f"hf_tokenizer: cannot read {file}: {err}") from None
        # The post-processor only adds special tokens (we add BOS and EOS ourselves, as the model
        # does) and may trim whitespace out of token offsets, which the loss mask is read from.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.post_processor = None
        # A second copy encodes plain text with special-token strings kept as text, so a dataset
        # row cannot forge <|eot_id|> (as llama3_tokenizer); chat templates need them parsed.
        self._text_tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        self._text_tokenizer.encode_special_tokens = True
        self.path = str(path)
        self.max_seq_len = max_seq_len
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

        config_file = folder / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        special = {key: _token_content(config.get(key), key, config_file) for key in SPECIAL_TOKEN_KEYS}
        self.special_tokens = {key: token for key, token in special.items() if token is not None}
        generation_file = folder / "generation_config.json"
        generation = read_json(generation_file) if generation_file.is_file() else {}
        generation_eos = generation.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])

        self.bos_id = self._id_of(special["bos_token"], "bos_token", config_file)
        eos_id = self._id_of(special["eos_token"], "eos_token", config_file)
        if eos_id is None and not generation_eos:
            raise ConfigError(
                f"hf_tokenizer: {folder} names no end-of-sequence token: set eos_token in {config_file.name} "
                f"or eos_token_id in {generation_file.name}"
            )
        self.eos_id: int = eos_id if eos_id is not None else generation_eos[0]
        pad_id = self._id_of(special["pad_token"], "pad_token", config_file)
        # Padded positions never reach the loss, so any id pads; eos is what Llama 3 folders imply.
        self.pad_id: int = pad_id if pad_id is not None else self.eos_id
        self.stop_tokens = list(dict.fromkeys([self.eos_id, *generation_eos]))
        self.adds_bos = self.bos_id is not None and self.bos_id in tokenizer.encode("").ids
        self._atomic = [token.content for token in self._tokenizer.get_added_tokens_decoder().values()]

        found = read_chat_template(folder, chat_template)
        self.chat_template = ChatTemplate(found[0], found[1], self.special_tokens) if found else None
        self._folder = folder

    def _id_of(self, token: str | None, key: str, source: Path) -> int | None:
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ConfigError(f"{source}: {key} {token!r} is not in the vocabulary of {self.path}")
        return token_id

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encode text; a BOS only where the model's own tokenizer adds one (Qwen's adds none), and
        special-token strings in the text stay text."""
        ids = self._text_tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.adds_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; special tokens are dropped unless asked for (to inspect a chat layout)."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def tokenize_messages(
        self, messages: Sequence[Message], add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Lay messages out with the folder's chat template; mask True = excluded from the loss.

        The ids are `apply_chat_template`'s for the same messages. Each token takes the mask of the
        message it belongs to (see `ChatTemplate.spans`): an assistant turn trains its content and
        the end-of-turn text the template writes after it, never its header, which is masked with
        the message before it. A token that straddles two spans is trained only if both are.
        With `add_end_tokens=False` a final assistant message becomes the generation prompt
        followed by its content, unclosed, to prompt generation. Longer results are cut to
        `max_seq_len` (see `truncate`).
        """
        if self.chat_template is None:
            raise ConfigError(
                f"hf_tokenizer: {self._folder} has no chat template (looked for {', '.join(TEMPLATE_FILES)}); "
                "a base model ships none: pass tokenizer.chat_template=<a .jinja file>, or use a text dataset"
            )
        text, spans = self.chat_template.spans(messages, self._atomic, prompt=not add_end_tokens)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        masked_chars = [False] * len(text)
        for start, end, masked in spans:
            if masked:
                masked_chars[start:end] = [True] * (end - start)
        last = len(text) - 1
        # A zero-width token (an inserted "▁") takes the mask of the character it stands before.
        mask = [any(masked_chars[min(start, last):max(end, min(start, last) + 1)]) for start, end in encoding.offsets]
        if not encoding.ids:
            raise DataError(f"chat template {self.chat_template.name} rendered the conversation as no tokens")
        return truncate(encoding.ids, mask, self.max_seq_len, self.eos_id if add_end_tokens else None)


def hf_tokenizer(path: str, max_seq_len: int | None = None, chat_template: str | None = None) -> HFTokenizer:
    """Build the tokenizer of a Hugging Face model folder (or its tokenizer.json), with its chat
    template; `chat_template` (a .jinja file) replaces the folder's, e.g. for a base model."""
    return HFTokenizer(path, max_seq_len=max_seq_len, chat_template=chat_template)
