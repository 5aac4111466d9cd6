"""Llama 2 tokenizer: Meta's SentencePiece model and the `[INST]` / `<<SYS>>` chat layout."""

from collections.abc import Sequence

import sentencepiece

from tunelite.errors import ConfigError, DataError
from tunelite.tokenizers.llama3 import is_tiktoken_bpe
from tunelite.tokenizers.messages import Message, check_tokenizer_file, read_head, truncate

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Llama2Tokenizer:
    """Meta's Llama 2 SentencePiece tokenizer, with chat formatting and loss masks."""

    def __init__(self, path: str, max_seq_len: int | None = None) -> None:
        file = check_tokenizer_file(path, "llama2_tokenizer")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(file))
        except (RuntimeError, OSError) as err:
            hint = (
                "it is a Llama 3 tiktoken BPE file; build it with llama3_tokenizer instead"
                if is_tiktoken_bpe(read_head(file))
                else "expected Meta's Llama 2 SentencePiece tokenizer.model"
            )
            raise ConfigError(f"llama2_tokenizer: cannot read {file}: {hint}") from err
        self.path = path
        self.max_seq_len = max_seq_len
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(
                f"llama2_tokenizer: {file} defines no bos or eos token, so it is not a Llama 2 "
                "tokenizer"
            )
        # Meta's model has no pad token (pad_id -1); 0 (<unk>) is what torchtune pads with,
        # and padded positions never reach the loss anyway.
        self.pad_id = max(self._sp.pad_id(), 0)
        self.vocab_size = self._sp.get_piece_size()
        self.stop_tokens = [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Encode text; "<s>" or "</s>" in it stay plain text: SentencePiece never parses them."""
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode ids; with `skip_special_tokens=False` bos/eos appear as `<s>` / `</s>`.

        SentencePiece always drops control tokens, so to show them each run between them
        is decoded on its own, which also drops the run's leading dummy-prefix space: the
        result reads like Meta's template, e.g. `<s>[INST] hi [/INST] hello </s>`.
        """
        ids = list(ids)
        if skip_special_tokens:
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if self._sp.is_control(i):
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def tokenize_messages(
        self, messages: Sequence[Message], add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]:
        """Lay messages out as Meta's `chat_completion` does; mask True = excluded from the loss.

        Each user/assistant pair is `<s>` + `[INST] {user} [/INST] {assistant} ` + `</s>`,
        contents stripped, a system message folded into the first user message as
        `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; a trailing user message becomes
        `<s>[INST] {user} [/INST]` with no `</s>`, the prompt for generation. The `[INST]`
        part is encoded apart from the answer so each keeps its own mask; the ids equal
        Meta's single encoding because SentencePiece pieces never span the space before
        the answer. `<s>` takes the user message's mask, `</s>` the assistant's.
        With `add_end_tokens=False` a final assistant message is encoded without its
        trailing space and `</s>` (an empty one adds nothing), to prompt generation.
        Longer results are cut to `max_seq_len` (see `truncate`).
        """
        turns = _pair_turns(messages)
        tokens: list[int] = []
        mask: list[bool] = []
        for i, (user, assistant) in enumerate(turns):
            prompt = [self.bos_id] + self.encode(
                f"{B_INST} {user.content.strip()} {E_INST}", add_bos=False, add_eos=False
            )
            tokens += prompt
            mask += [user.masked] * len(prompt)
            if assistant is None:
                continue
            answer = assistant.content.strip()
            if add_end_tokens or i < len(turns) - 1:
                reply = self.encode(f"{answer} ", add_bos=False, add_eos=True)
            else:
                reply = self.encode(answer, add_bos=False, add_eos=False) if answer else []
            tokens += reply
            mask += [assistant.masked] * len(reply)
        return truncate(tokens, mask, self.max_seq_len, self.eos_id if add_end_tokens else None)


def llama2_tokenizer(path: str, max_seq_len: int | None = None) -> Llama2Tokenizer:
    """Build the Llama 2 tokenizer from Meta's SentencePiece `tokenizer.model`."""
    return Llama2Tokenizer(path, max_seq_len=max_seq_len)


def _pair_turns(messages: Sequence[Message]) -> list[tuple[Message, Message | None]]:
    """Fold the system prompt into the first user message and pair users with replies."""
    if not messages:
        raise DataError("tokenize_messages got an empty list of messages")
    messages = list(messages)
    if messages[0].role == "system":
        if len(messages) < 2 or messages[1].role != "user":
            raise DataError("Llama 2 chat: a system message must be followed by a user message")
        system, user = messages[0], messages[1]
        merged = B_SYS + system.content + E_SYS + user.content
        messages = [Message("user", merged, user.masked)] + messages[2:]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise DataError(
                f"Llama 2 chat: message {i} (after folding in the system prompt) has role "
                f"{message.role!r}, expected {expected!r}: roles must alternate user/assistant, "
                "starting with user, with at most one system message first"
            )
    replies: list[Message | None] = list(messages[1::2])
    if len(messages) % 2:
        replies.append(None)
    return list(zip(messages[0::2], replies))
