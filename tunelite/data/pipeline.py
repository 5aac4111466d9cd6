"""The one path every dataset builder takes: source -> rows -> partition -> samples -> (packs).

A builder contributes only how one row becomes samples; reading, the train / validation
partition, locating a bad row, counting skipped samples and packing are the same for all.
Everything runs when the builder is called, so bad data fails before the model loads.
"""

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, TypeVar

from torch.utils.data import Dataset

from tunelite.data.packing import PackedDataset
from tunelite.data.partition import partition_rows
from tunelite.data.samples import TokenizedDataset
from tunelite.data.sources import SourceRow, load_rows
from tunelite.errors import ConfigError, DataError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.tokenizers.messages import Message, messages_from_dicts, truncate


class DataTokenizer(Protocol):
    """What the builders use of a tokenizer; hf_tokenizer and both Llama tokenizers have it."""

    eos_id: int
    pad_id: int
    max_seq_len: int | None

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...

    def tokenize_messages(
        self, messages: Sequence[Message], add_end_tokens: bool = True
    ) -> tuple[list[int], list[bool]]: ...


Sample = tuple[list[int], list[int]]
T = TypeVar("T")
# A row's samples (tokens, labels) for a max_seq_len, or None when truncation cut the row's
# whole response (the row is then skipped and counted). A DataError it raises gets the row's
# file and line prefixed.
RowSamples = Callable[[SourceRow, int | None], list[Sample] | None]


def build_dataset(
    tokenizer: DataTokenizer,
    source: str,
    row_samples: RowSamples,
    *,
    split: str,
    max_seq_len: int | None,
    packed: bool,
    val_fraction: float,
    partition: str,
    document_split: str = "file",
) -> Dataset:
    """Samples of `partition` of `source`, packed into max_seq_len sequences if `packed`."""
    seq_len = max_seq_len if max_seq_len is not None else tokenizer.max_seq_len
    if packed and seq_len is None:
        raise ConfigError("packed: True needs max_seq_len (on the dataset or the tokenizer), the length of a pack")
    dataset = TokenizedDataset()
    for tokens, labels in partition_samples(source, row_samples, seq_len, split=split, val_fraction=val_fraction,
                                            partition=partition, document_split=document_split):
        dataset.append(tokens, labels)
    return PackedDataset(dataset, seq_len, tokenizer.pad_id) if packed else dataset


def partition_samples(
    source: str,
    row_samples: Callable[[SourceRow, int | None], list[T] | None],
    seq_len: int | None,
    *,
    split: str,
    val_fraction: float,
    partition: str,
    document_split: str = "file",
) -> Iterator[T]:
    """Every sample of `partition`'s rows of `source`, in order, whatever a sample is (a tokens /
    labels pair, a preference pair): a DataError from `row_samples` gets its row's file and line
    prefixed; rows whose response truncation cut away are skipped, then warned about (an error
    when every row was)."""
    rows = partition_rows(load_rows(source, split, document_split), val_fraction, partition, source)
    skipped = 0
    for row in rows:
        try:
            samples = row_samples(row, seq_len)
        except DataError as err:
            raise DataError(f"{row.where}: {err}") from None
        if samples is None:
            skipped += 1
            continue
        yield from samples
    if skipped == len(rows):
        raise DataError(
            f"{source}: every one of the {len(rows)} {partition} rows lost its whole response to "
            f"truncation at max_seq_len {seq_len}; raise max_seq_len"
        )
    if skipped:
        warnings.warn(
            f"{source}: skipped {skipped} of {len(rows)} {partition} rows whose response was cut off "
            f"entirely by max_seq_len {seq_len}; raise max_seq_len to train on them",
            stacklevel=4,
        )


def message_samples(
    tokenizer: DataTokenizer,
    row_messages: Callable[[SourceRow], list[Mapping[str, str]]],
    train_on_input: bool,
) -> RowSamples:
    """Row -> `{"role", "content"}` dicts -> one sample in the tokenizer's chat layout.

    Labels are -100 on every turn but the assistant's unless `train_on_input`. A row whose
    response tokens are all cut by truncation yields None (skipped): training on the prompt
    alone would teach nothing about answering, and silently so.
    """
    train_on = "all" if train_on_input else "assistant"

    def tokenize(dicts: list[Mapping[str, str]], policy: str, seq_len: int | None) -> tuple[list[int], list[bool]]:
        tokens, mask = tokenizer.tokenize_messages(messages_from_dicts(dicts, train_on=policy))
        return truncate(tokens, mask, seq_len, tokenizer.eos_id)

    def samples(row: SourceRow, seq_len: int | None) -> list[Sample] | None:
        dicts = row_messages(row)
        tokens, mask = tokenize(dicts, train_on, seq_len)
        if train_on_input:
            # Every kept token is trained, so only a second, response-only layout shows whether
            # any response survived; that is needed only when the sample may have been cut.
            limits = [n for n in (seq_len, tokenizer.max_seq_len) if n is not None]
            cut = bool(limits) and len(tokens) >= min(limits)
            response_kept = not cut or not all(tokenize(dicts, "assistant", seq_len)[1])
        else:
            response_kept = not all(mask)
        if not response_kept:
            return None
        return [(tokens, [IGNORE_INDEX if masked else t for t, masked in zip(tokens, mask)])]

    return samples
