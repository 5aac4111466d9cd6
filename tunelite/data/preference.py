"""Preference pairs (a prompt, a chosen and a rejected response) for DPO and its kin.

Rows take either layout TRL and the hub's preference sets use:
- a shared prompt column and two response columns: `{"prompt": ..., "chosen": ..., "rejected": ...}`,
  the prompt a string (one user turn) or OpenAI messages, each response a string (the assistant's
  reply) or OpenAI messages (assistant turns);
- two whole conversations with the prompt implicit: `{"chosen": [messages], "rejected": [messages]}`,
  which must differ only in their last turn, the assistant's.
Both responses are laid out in the tokenizer's chat format after the same prompt; only the
response tokens are labelled.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from tunelite.data.chat import openai_turns
from tunelite.data.collate import padded_collate
from tunelite.data.pipeline import DataTokenizer, message_samples, partition_samples
from tunelite.data.samples import TokenizedDataset
from tunelite.data.sources import SourceRow
from tunelite.errors import ConfigError, DataError


class PreferenceDataset(Dataset):
    """Pairs `{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}`, tokenized up front."""

    def __init__(self) -> None:
        self.chosen, self.rejected = TokenizedDataset(), TokenizedDataset()

    def append(self, chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]]) -> None:
        self.chosen.append(*chosen)
        self.rejected.append(*rejected)

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        chosen, rejected = self.chosen[index], self.rejected[index]
        return {"chosen_tokens": chosen["tokens"], "chosen_labels": chosen["labels"],
                "rejected_tokens": rejected["tokens"], "rejected_labels": rejected["labels"]}


def preference_dataset(
    tokenizer: DataTokenizer,
    source: str,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    system_prompt: str | None = None,
    split: str = "train",
    max_seq_len: int | None = None,
    val_fraction: float = 0.0,
    partition: str = "train",
) -> Dataset:
    """Preference pairs from a file, a glob or a hub dataset (see the module's layouts). A row
    without `prompt_column` is read as two whole conversations. `system_prompt` becomes the first
    turn of every prompt without a system turn of its own. A pair either of whose responses
    truncation at max_seq_len cuts away entirely is skipped and counted in a warning."""
    seq_len = max_seq_len if max_seq_len is not None else tokenizer.max_seq_len

    def conversations(row: SourceRow) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        prompt, chosen, rejected = _prompt_and_responses(row, prompt_column, chosen_column, rejected_column)
        if system_prompt is not None and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        return prompt + chosen, prompt + rejected

    chosen_samples = message_samples(tokenizer, lambda row: conversations(row)[0], train_on_input=False)
    rejected_samples = message_samples(tokenizer, lambda row: conversations(row)[1], train_on_input=False)

    def pair(row: SourceRow, length: int | None) -> list[tuple[Any, Any]] | None:
        chosen, rejected = chosen_samples(row, length), rejected_samples(row, length)
        return None if chosen is None or rejected is None else [(chosen[0], rejected[0])]

    dataset = PreferenceDataset()
    for chosen, rejected in partition_samples(source, pair, seq_len, split=split, val_fraction=val_fraction,
                                              partition=partition):
        dataset.append(chosen, rejected)
    return dataset


def _prompt_and_responses(
    row: SourceRow, prompt_column: str, chosen_column: str, rejected_column: str
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    for column in (chosen_column, rejected_column):
        if column not in row.values:
            raise row.missing(column)
    if prompt_column in row.values:
        prompt = _turns(row.values[prompt_column], prompt_column, "user")
        chosen = _turns(row.values[chosen_column], chosen_column, "assistant")
        rejected = _turns(row.values[rejected_column], rejected_column, "assistant")
    else:
        whole_chosen = openai_turns(row.values[chosen_column], chosen_column)
        whole_rejected = openai_turns(row.values[rejected_column], rejected_column)
        prompt, chosen, rejected = whole_chosen[:-1], whole_chosen[-1:], whole_rejected[-1:]
        if whole_rejected[:-1] != prompt:
            raise DataError(f"columns {chosen_column!r} and {rejected_column!r} must be the same conversation up to "
                            f"their last turn (the prompt); they differ before it. Give the prompt a column of its "
                            f"own ({prompt_column!r}) if they share none")
        if not prompt:
            raise DataError(f"column {chosen_column!r} holds one turn and no prompt before it; add a {prompt_column!r} "
                            "column, or the user's turn before the assistant's")
    for column, response in ((chosen_column, chosen), (rejected_column, rejected)):
        if response[-1]["role"] != "assistant":
            raise DataError(f"column {column!r}: the response must end with an assistant turn, not "
                            f"{response[-1]['role']!r}")
    return prompt, chosen, rejected


def _turns(value: Any, column: str, role: str) -> list[dict[str, str]]:
    """A column that holds a string (one turn of `role`) or OpenAI messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return openai_turns(value, column)
    raise DataError(f"column {column!r} must be a string or a list of {{role, content}} turns, "
                    f"got {type(value).__name__}")


def preference_collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch's chosen sequences then its rejected ones, padded together, so one forward runs both:
    `tokens` and `labels` are (2 b, s), rows :b chosen, rows b: rejected (labels shifted as in
    padded_collate)."""
    if not batch or "chosen_tokens" not in batch[0]:
        raise ConfigError("preference_collate batches preference pairs (chosen_* and rejected_* samples); "
                          "use a preference dataset such as tunelite.data.preference_dataset")
    sequences = [{"tokens": s[f"{side}_tokens"], "labels": s[f"{side}_labels"]}
                 for side in ("chosen", "rejected") for s in batch]
    return padded_collate(sequences, pad_id)
