"""Plain text for continued pretraining: every token trained, long documents kept whole.

A document longer than max_seq_len becomes several samples rather than being truncated
away. Consecutive chunks overlap by one token: a chunk's last token cannot be trained (its
target lies in the next chunk), so the next chunk starts with it and predicts from there,
and every token of the document after the first is a target exactly once.
"""

from torch.utils.data import Dataset

from tunelite.data.pipeline import DataTokenizer, Sample, build_dataset
from tunelite.data.sources import SourceRow, text_value
from tunelite.errors import ConfigError


def text_completion_dataset(
    tokenizer: DataTokenizer,
    source: str,
    *,
    column: str = "text",
    document_split: str = "file",
    split: str = "train",
    max_seq_len: int | None = None,
    packed: bool = False,
    val_fraction: float = 0.0,
    partition: str = "train",
) -> Dataset:
    """Documents from a table's `column`, or from .txt files (whose rows have the column `text`).

    `document_split` says what a document is in a .txt file: `file` (default: the whole
    file, so a long text keeps its context across paragraphs) or `blank_lines` (each
    blank-line-separated block, for files that hold many short documents). Each document is
    `<bos> text <eos>`. The train / validation partition is over documents, before chunking,
    so no document has chunks on both sides.
    """
    seq_len = max_seq_len if max_seq_len is not None else tokenizer.max_seq_len
    if seq_len is None or seq_len < 2:
        raise ConfigError(
            f"text_completion_dataset needs max_seq_len of at least 2 (on the dataset or the tokenizer) "
            f"to cut documents into samples, got {seq_len}"
        )

    def row_samples(row: SourceRow, seq_len: int) -> list[Sample]:
        tokens = tokenizer.encode(text_value(row, column), add_bos=True, add_eos=True)
        starts = range(0, max(len(tokens) - 1, 1), seq_len - 1)
        return [(tokens[s : s + seq_len],) * 2 for s in starts]

    return build_dataset(
        tokenizer, source, row_samples, split=split, max_seq_len=seq_len, packed=packed,
        val_fraction=val_fraction, partition=partition, document_split=document_split,
    )
