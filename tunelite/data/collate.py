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

    Packed samples (those with `document_ids`) also get `positions` (b, s) and a block-causal
    `mask` (b, 1, s, s) for `model.hidden_states(tokens, positions, mask)`; unpacked batches
    get neither, so the model runs causal SDPA without materialising a mask.
    """
    longest = max(len(s["tokens"]) for s in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "tokens": _padded(batch, "tokens", pad_id, length),
        "labels": _padded(batch, "labels", IGNORE_INDEX, length, shift=1),
    }
    if "document_ids" in batch[0]:
        out["positions"] = _padded(batch, "positions", 0, length)
        out["mask"] = block_causal_mask(_padded(batch, "document_ids", PAD_DOCUMENT, length))
    return out


def _padded(batch: Sequence[dict[str, list[int]]], key: str, fill: int, length: int, shift: int = 0) -> torch.Tensor:
    """One key of every sample as a (b, length) tensor, dropping the first `shift` values."""
    out = torch.full((len(batch), length), fill, dtype=torch.long)
    for i, sample in enumerate(batch):
        values = sample[key][shift:]
        out[i, : len(values)] = torch.as_tensor(values)
    return out


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """SDPA boolean mask (b, 1, s, s), True = may attend: causal within each document only.

    A padding position attends to itself alone, so no row of the mask is all False (which
    would make SDPA's softmax NaN); its outputs carry no label and never reach the loss.
    """
    s = document_ids.shape[1]
    same = (document_ids[:, :, None] == document_ids[:, None, :]) & (document_ids[:, :, None] != PAD_DOCUMENT)
    causal = torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    itself = torch.eye(s, dtype=torch.bool, device=document_ids.device)
    return ((same & causal) | itself)[:, None]
