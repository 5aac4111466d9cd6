"""Batches of variable-length samples, padded to the longest sample of the batch only."""

import torch

from tunelite.modules.loss import IGNORE_INDEX


def padded_collate(
    batch: list[dict[str, list[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Pads tokens with `pad_id` and labels with -100, and shifts labels left by one, so
    `labels[:, i]` is the target of the prediction made at position i."""
    longest = max(len(s["tokens"]) for s in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, sample in enumerate(batch):
        n = len(sample["tokens"])
        tokens[i, :n] = torch.tensor(sample["tokens"])
        labels[i, : n - 1] = torch.tensor(sample["labels"][1:])
    return {"tokens": tokens, "labels": labels}
