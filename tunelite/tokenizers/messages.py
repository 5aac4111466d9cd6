"""Chat messages and the pieces both Llama tokenizers share.

A conversation reaches a tokenizer as `Message`s that already carry their loss mask, so the
tokenizers only lay out tokens and never decide what is trained: that policy (`train_on`)
lives in one place, `messages_from_dicts`.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelite.errors import ConfigError, DataError
from tunelite.files import MAX_TOKENIZER_BYTES, check_size

ROLES = ("system", "user", "assistant", "ipython")
TRAIN_ON = ("assistant", "all")


@dataclass(frozen=True)
class Message:
    """One chat turn; `masked=True` keeps all of its tokens out of the loss."""

    role: str
    content: str
    masked: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise DataError(f"message role {self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise DataError(
                f"{self.role} message content must be a string, got {type(self.content).__name__}"
            )


def messages_from_dicts(
    rows: Sequence[Mapping[str, Any]], train_on: str = "assistant"
) -> list[Message]:
    """Build Messages from `{"role", "content"}` dicts, masking by policy.

    `train_on="assistant"` trains only on the model's own replies (the usual instruction
    tuning); `train_on="all"` also trains on prompts, e.g. for continued pretraining on chats.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    messages = []
    for i, row in enumerate(rows):
        missing = [key for key in ("role", "content") if key not in row]
        if missing:
            raise DataError(f"message {i} has no {' or '.join(missing)} key: {dict(row)!r}")
        role = row["role"]
        masked = train_on == "assistant" and role != "assistant"
        messages.append(Message(role=role, content=row["content"], masked=masked))
    return messages


def truncate(
    tokens: list[int], mask: list[bool], max_seq_len: int | None, eos_id: int | None
) -> tuple[list[int], list[bool]]:
    """Cut to `max_seq_len`, ending on an eos that is not trained.

    The cut eos marks where the sample was cut, not where an answer ended, so training on
    it would teach the model to stop mid-answer (torchtune masks it for the same reason).
    """
    if max_seq_len is None or len(tokens) <= max_seq_len:
        return tokens, mask
    tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
    if eos_id is not None:
        tokens[-1] = eos_id
        mask[-1] = True
    return tokens, mask


def check_tokenizer_file(path: str, builder: str) -> Path:
    """Fail with the file's name before a tokenizer library fails with a bare OS error."""
    file = Path(path)
    if not file.is_file():
        where = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(
            f"{builder}: tokenizer file {path} {where}; pass the path of the model's "
            "tokenizer.model (Meta checkpoints keep it in original/tokenizer.model)"
        )
    return check_size(file, MAX_TOKENIZER_BYTES, "tokenizer file", ConfigError)


def read_head(file: Path, size: int = 4096) -> bytes:
    """The first bytes of a file, enough to tell its format by."""
    with open(file, "rb") as head:
        return head.read(size)
