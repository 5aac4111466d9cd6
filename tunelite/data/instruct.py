"""Instruction data (an instruction, an optional input, a response) as single-turn chats.

Each row becomes a user turn (the prompt template filled in) and an assistant turn (the
response), laid out by the tokenizer's own chat format; labels are -100 on the prompt unless
`train_on_input`.
"""

import string
from collections.abc import Mapping

from torch.utils.data import Dataset

from tunelite.data.pipeline import DataTokenizer, build_dataset, message_samples
from tunelite.data.sources import SourceRow, text_value
from tunelite.errors import ConfigError, DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCT_COLUMNS = ("instruction", "input", "output")
PLACEHOLDERS = ("instruction", "input")


def instruct_dataset(
    tokenizer: DataTokenizer,
    source: str,
    *,
    column_map: Mapping[str, str] | None = None,
    prompt_template: str | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    val_fraction: float = 0.0,
    partition: str = "train",
) -> Dataset:
    """Instruction / input / response rows from a file, a glob or a hub dataset.

    `column_map` renames the columns a row is read from, e.g. `{instruction: prompt, output:
    response}`; the input column is optional in every row (absent or null reads as empty).
    `prompt_template` is the user turn, with `{instruction}` and optionally `{input}`; without
    one, rows use the Alpaca prompt, in its no-input wording when the input is empty.
    `max_seq_len` defaults to the tokenizer's; `val_fraction` and `partition` select a
    deterministic train / validation share of the rows (see `partition_rows`).
    """
    columns = _columns(column_map)
    with_input, without_input = (
        (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT) if prompt_template is None else (prompt_template,) * 2
    )
    takes_input = "input" in _placeholders(with_input)

    def row_messages(row: SourceRow) -> list[dict[str, str]]:
        instruction = text_value(row, columns["instruction"])
        extra = text_value(row, columns["input"], required=False)
        if extra and not takes_input:
            raise DataError(
                f"column {columns['input']!r} is not empty but prompt_template has no {{input}}; "
                "add it, or point column_map.input at a column the data lacks"
            )
        prompt = (with_input if extra else without_input).format(instruction=instruction, input=extra)
        response = text_value(row, columns["output"])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    return build_dataset(
        tokenizer, source, message_samples(tokenizer, row_messages, train_on_input),
        split=split, max_seq_len=max_seq_len, packed=packed, val_fraction=val_fraction, partition=partition,
    )


def alpaca_dataset(
    tokenizer: DataTokenizer,
    source: str = "tatsu-lab/alpaca",
    *,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    val_fraction: float = 0.0,
    partition: str = "train",
) -> Dataset:
    """Alpaca data (`instruction`, `input`, `output` columns, the Alpaca prompt), as torchtune's
    `alpaca_dataset`: a local file, or by default the hub's tatsu-lab/alpaca."""
    return instruct_dataset(
        tokenizer, source, split=split, train_on_input=train_on_input, max_seq_len=max_seq_len,
        packed=packed, val_fraction=val_fraction, partition=partition,
    )


def _columns(column_map: Mapping[str, str] | None) -> dict[str, str]:
    unknown = sorted(set(column_map or {}) - set(INSTRUCT_COLUMNS))
    if unknown:
        raise ConfigError(
            f"column_map: unknown keys {unknown}; it maps {', '.join(INSTRUCT_COLUMNS)} to your column names"
        )
    return {name: (column_map or {}).get(name, name) for name in INSTRUCT_COLUMNS}


def _placeholders(template: str) -> set[str]:
    """The template's fields, checked: `{instruction}` required, `{input}` optional, nothing else."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"prompt_template: {err}; write {{{{ and }}}} for literal braces") from None
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown or "instruction" not in fields:
        raise ConfigError(
            f"prompt_template: placeholders must be {{instruction}} and optionally {{input}}, got {sorted(fields)}; "
            "write {{ and }} for literal braces"
        )
    return fields
