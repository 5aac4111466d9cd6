"""Batches of variable-length or packed samples, padded to the longest sample of the batch only."""

from collections.abc import Sequence

import torch

from tunelite.data.packing import PAD_DOCUMENT
from tunelite.modules.loss import IGNORE_INDEX


def padded_collate(
    batch: Sequence[dict[str, list[int]]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """Pads tokens with `pad_id` and labels with -100, and shifts labels left by one, so
    `labels[:, i]` is the target of the prediction made at position i.

    Packed samples (those with `document_ids`) also get `positions` and `document_ids` (b, s),
    padding being document -1, for `model.hidden_states(tokens, positions, document_ids=...)`,
    which keeps each document's attention to itself without a dense (s x s) mask (16 GiB at
    128k tokens); unpacked batches get neither, so the model runs causal flash attention.
    """
    longest = max(len(s["tokens"]) for s in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "tokens": _padded(batch, "tokens", pad_id, length),
        "labels": _padded(batch, "labels", IGNORE_INDEX, length, shift=1),
    }
    if "document_ids" in batch[0]:
        out["positions"] = _padded(batch, "positions", 0, length)
        out["document_ids"] = _padded(batch, "document_ids", PAD_DOCUMENT, length)
    return out


def _padded(batch: Sequence[dict[str, list[int]]], key: str, fill: int, length: int, shift: int = 0) -> torch.Tensor:
    """One key of every sample as a (b, length) tensor, dropping the first `shift` values."""
    out = torch.full((len(batch), length), fill, dtype=torch.long)
    for i, sample in enumerate(batch):
        values = sample[key][shift:]
        out[i, : len(values)] = torch.as_tensor(values)
    return out

