"""Instruction data (Alpaca's instruction / input / output) as token ids and labels.

Each row becomes a user turn (the Alpaca prompt) and an assistant turn (the output), laid out
by the tokenizer's own chat format; labels are -100 on the prompt unless `train_on_input`.
"""

from pathlib import Path
from typing import Any, Protocol

from torch.utils.data import Dataset

from tunelite.data.files import read_json_rows
from tunelite.errors import DataError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.tokenizers.messages import Message, truncate

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class ChatTokenizer(Protocol):
    eos_id: int

    def tokenize_messages(self, messages: list[Message], add_end_tokens: bool = True) -> tuple[list[int], list[bool]]: ...


class TokenizedDataset(Dataset):
    """Samples tokenized once up front: `{"tokens": [...], "labels": [...]}` of equal length."""

    def __init__(self, samples: list[dict[str, list[int]]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[index]


def _text(row: dict[str, Any], column: str, source: str, index: int, required: bool = True) -> str:
    if column not in row:
        if not required:
            return ""
        raise DataError(f"{source}, row {index}: column {column!r} is missing (columns present: {sorted(row)})")
    value = row[column]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{source}, row {index}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def alpaca_dataset(
    tokenizer: ChatTokenizer, source: str, max_seq_len: int | None = None, train_on_input: bool = False
) -> TokenizedDataset:
    """Alpaca-format instruction data from a local .json/.jsonl file."""
    rows = read_json_rows(source)
    samples = []
    for i, row in enumerate(rows):
        instruction = _text(row, "instruction", source, i)
        extra = _text(row, "input", source, i, required=False)
        output = _text(row, "output", source, i)
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        messages = [
            Message("user", template.format(instruction=instruction, input=extra), masked=not train_on_input),
            Message("assistant", output),
        ]
        tokens, mask = tokenizer.tokenize_messages(messages)
        tokens, mask = truncate(tokens, mask, max_seq_len, tokenizer.eos_id)
        labels = [IGNORE_INDEX if m else t for t, m in zip(tokens, mask)]
        samples.append({"tokens": tokens, "labels": labels})
    if not samples:
        raise DataError(f"{Path(source)} holds no rows")
    return TokenizedDataset(samples)
