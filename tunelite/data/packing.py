"""Packing: several samples in one sequence of exactly max_seq_len tokens, none seeing another.

Samples fill a pack in order until the next one does not fit; the pack is then padded to
max_seq_len and the next one starts. A sample is never split across packs, since its second
half would lose the context the unpacked run gives it. Each sample's positions restart at 0
and its `document_ids` entry lets the model keep attention within each sample (block-causal,
tunelite.modules.attention), so a packed sample's loss equals its loss alone.

Labels stay unshifted, as in unpacked samples (the collate shifts them), but each sample's
first label is -100: after the shift that is the target of the previous sample's last token,
which must not learn to predict the next, unrelated sample. Alone, that first label is never
used either, so nothing else changes.
"""

from torch.utils.data import Dataset

from tunelite.data.samples import TokenizedDataset
from tunelite.modules.loss import IGNORE_INDEX

PAD_DOCUMENT = -1


class PackedDataset(Dataset):
    """Packs of `samples`: dicts of `tokens`, `labels`, `positions` and `document_ids`."""

    def __init__(self, samples: TokenizedDataset, max_seq_len: int, pad_id: int) -> None:
        self.samples, self.max_seq_len, self.pad_id = samples, max_seq_len, pad_id
        self._lengths = samples.lengths()
        self._starts = [0]  # pack k holds samples _starts[k] .. _starts[k + 1] - 1
        used = 0
        for index, length in enumerate(self._lengths):
            if length > max_seq_len:
                raise ValueError(f"sample {index} has {length} tokens, more than max_seq_len {max_seq_len}")
            if used + length > max_seq_len:
                self._starts.append(index)
                used = 0
            used += length
        if self._lengths:
            self._starts.append(len(self._lengths))

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        index = range(len(self))[index]  # negative indices and IndexError, as for a list
        first, stop = self._starts[index], self._starts[index + 1]
        tokens, labels = (part.tolist() for part in self.samples.span(first, stop))
        positions: list[int] = []
        document_ids: list[int] = []
        for document, length in enumerate(self._lengths[first:stop]):
            labels[len(positions)] = IGNORE_INDEX
            positions += range(length)
            document_ids += [document] * length
        pad = self.max_seq_len - len(tokens)
        return {
            "tokens": tokens + [self.pad_id] * pad,
            "labels": labels + [IGNORE_INDEX] * pad,
            "positions": positions + [0] * pad,
            "document_ids": document_ids + [PAD_DOCUMENT] * pad,
        }
