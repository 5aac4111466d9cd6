"""Multi-turn conversations in the OpenAI or the ShareGPT layout, trained on the assistant's turns.

OpenAI:   {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt", "value": "..."}, ...]}
"""

from typing import Any

from torch.utils.data import Dataset

from tunelite.data.pipeline import DataTokenizer, build_dataset, message_samples
from tunelite.data.sources import SourceRow
from tunelite.errors import ConfigError, DataError
from tunelite.tokenizers.messages import ROLES

# style -> (default column, role key, content key)
STYLES = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
# style -> {role as the data spells it: our role}
ROLE_NAMES = {
    "openai": {role: role for role in ROLES},
    "sharegpt": {"system": "system", "human": "user", "gpt": "assistant"},
}


def chat_dataset(
    tokenizer: DataTokenizer,
    source: str,
    *,
    conversation_style: str = "auto",
    column: str | None = None,
    system_prompt: str | None = None,
    split: str = "train",
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    val_fraction: float = 0.0,
    partition: str = "train",
) -> Dataset:
    """Conversations from a file, a glob or a hub dataset; only assistant turns are trained
    unless `train_on_input`.

    `conversation_style` is `openai`, `sharegpt` or `auto`, which tells them apart per row by
    the column (`messages` / `conversations`) or, when `column` is given, by the keys of its
    first turn. `system_prompt` becomes the first turn of every conversation that has no
    system turn of its own (a row's own system prompt is the more specific one). Every
    conversation needs an assistant turn: without one it has nothing to train on.
    """
    if conversation_style not in (*STYLES, "auto"):
        raise ConfigError(f"conversation_style must be one of auto, {', '.join(STYLES)}; got {conversation_style!r}")

    def row_messages(row: SourceRow) -> list[dict[str, str]]:
        style, name = _style_and_column(row, conversation_style, column)
        messages = [_message(turn, style, name, index) for index, turn in enumerate(row.values[name])]
        if system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"column {name!r} has no assistant turn, so the conversation has nothing to train on")
        return messages

    return build_dataset(
        tokenizer, source, message_samples(tokenizer, row_messages, train_on_input),
        split=split, max_seq_len=max_seq_len, packed=packed, val_fraction=val_fraction, partition=partition,
    )


def _style_and_column(row: SourceRow, style: str, column: str | None) -> tuple[str, str]:
    """The layout and column of this row, after checking the column holds a non-empty list."""
    if column is None and style == "auto":
        found = [(name, columns[0]) for name, columns in STYLES.items() if columns[0] in row.values]
        if not found:
            raise DataError(
                "no 'messages' (OpenAI) or 'conversations' (ShareGPT) column; set dataset.column and "
                f"dataset.conversation_style (columns present: {row.columns})"
            )
        style, column = found[0]
    column = column or STYLES[style][0]
    turns = row.values.get(column)
    if turns is None:
        raise row.missing(column)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"column {column!r} must be a non-empty list of turns, got {_preview(turns)}")
    if style == "auto":
        first = turns[0] if isinstance(turns[0], dict) else {}
        detected = [name for name, (_, role_key, _) in STYLES.items() if role_key in first]
        if not detected:
            raise DataError(f"column {column!r}: its first turn has neither 'role' (OpenAI) nor 'from' (ShareGPT)")
        style = detected[0]
    return style, column


def openai_turns(value: Any, column: str) -> list[dict[str, str]]:
    """`value` read as OpenAI-style turns: a non-empty list of {"role", "content"}, each checked, an
    error naming the column and the turn."""
    if not isinstance(value, list) or not value:
        raise DataError(f"column {column!r} must be a non-empty list of turns, got {_preview(value)}")
    return [_message(turn, "openai", column, index) for index, turn in enumerate(value)]


def _message(turn: Any, style: str, column: str, index: int) -> dict[str, str]:
    _, role_key, content_key = STYLES[style]
    where = f"column {column!r}, turn {index}"
    if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
        raise DataError(f"{where}: expected an object with {role_key!r} and {content_key!r}, got {_preview(turn)}")
    role, content = turn[role_key], turn[content_key]
    roles = ROLE_NAMES[style]
    if not isinstance(role, str) or role not in roles:
        raise DataError(f"{where}: {role_key} {role!r} is not one of {', '.join(roles)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: {content_key!r} must be a string, got {type(content).__name__}")
    return {"role": roles[role], "content": content}


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
