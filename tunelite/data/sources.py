"""Rows from where users keep data: local files (one path or a glob) or a Hugging Face dataset.

Every row remembers where it came from, so an error can name the file and the place in it:
`line N` (counted from 1, as editors show it) for .jsonl, .csv and .txt files, `row N`
(counted from 0, as JSON lists, pyarrow and `datasets` index) for .json, .parquet and hub rows.
"""

import csv
import json
import re
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from tunelite.config.paths import DATASET_FORMATS, dataset_files
from tunelite.errors import ConfigError, DataError

DOCUMENT_SPLITS = ("file", "blank_lines")

_BLANK_LINES = re.compile(r"\n[ \t\r]*\n")


class SourceRow(NamedTuple):
    """One row's values and its place: `where` is what an error message starts with."""

    values: Mapping[str, Any]
    file: str
    unit: str  # "line" (1-based) or "row" (0-based)
    number: int

    @property
    def where(self) -> str:
        return f"{self.file}, {self.unit} {self.number}"

    @property
    def columns(self) -> list[str]:
        return sorted(map(str, self.values))

    def missing(self, column: str) -> DataError:
        """The error for a column this row lacks, listing those it has (a misspelt name shows)."""
        return DataError(f"column {column!r} is missing (columns present: {self.columns})")


def load_rows(source: str, split: str = "train", document_split: str = "file") -> list[SourceRow]:
    """All rows of `source`: a local file, a glob of them, or a hub dataset name.

    A glob's files are read in sorted order so the row order, and with it the train /
    validation partition, does not depend on the file system. `document_split` says how a
    .txt file becomes rows of one `text` column: `file` (the whole file is one document) or
    `blank_lines` (each blank-line-separated block is one).
    """
    if document_split not in DOCUMENT_SPLITS:
        raise ConfigError(f"document_split must be one of {', '.join(DOCUMENT_SPLITS)}, got {document_split!r}")
    files = dataset_files(source)
    if files is None:
        return _read_hub(source, split)
    return [row for path in files for row in _read_file(path, document_split)]


def text_value(row: SourceRow, column: str, required: bool = True) -> str:
    """The string in `column`; an optional column that is absent or null reads as ""."""
    value = row.values.get(column)
    if value is None:
        if not required:
            return ""
        raise row.missing(column)
    if not isinstance(value, str):
        raise DataError(f"column {column!r} must be a string, got {type(value).__name__}")
    return value


def _read_file(path: Path, document_split: str) -> list[SourceRow]:
    if path.suffix not in DATASET_FORMATS:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; accepted: {', '.join(DATASET_FORMATS)}")
    empty = DataError(f"{path} is empty: a dataset needs at least one row")
    if path.suffix == ".parquet":
        if path.stat().st_size == 0:
            raise empty
        rows = _parquet_rows(path)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not text.strip():
            raise empty
        readers = {
            ".json": _json_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows,
            ".txt": partial(_txt_rows, document_split=document_split),
        }
        rows = list(readers[path.suffix](path, text))
    if not rows:
        raise DataError(f"{path} holds no rows: a dataset needs at least one")
    return rows


def _json_rows(path: Path, text: str) -> Iterator[SourceRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        hint = (
            f"; its rows seem to be under {lists[0]!r}: make that list the file's top-level value"
            if len(data) == 1 and lists
            else ""
        )
        raise DataError(
            f"{path}: expected a JSON list of objects, got an object{hint} (or write one object per line as .jsonl)"
        )
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a {type(data).__name__}")
    for index, value in enumerate(data):
        yield _object_row(value, str(path), "row", index)


def _jsonl_rows(path: Path, text: str) -> Iterator[SourceRow]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: malformed JSON ({err.msg}); each line must be one JSON object"
            ) from None
        yield _object_row(value, str(path), "line", number)


def _object_row(value: Any, file: str, unit: str, number: int) -> SourceRow:
    if not isinstance(value, dict):
        raise DataError(f"{file}, {unit} {number}: expected a JSON object, got {type(value).__name__}")
    return SourceRow(value, file, unit, number)


def _csv_rows(path: Path, text: str) -> Iterator[SourceRow]:
    """Rows under the header; a row's number is the line it starts on (quoted fields may span lines)."""
    reader = csv.DictReader(text.splitlines(keepends=True))
    start = 2
    try:
        for values in reader:
            yield SourceRow(values, str(path), "line", start)
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({err})") from None


def _txt_rows(path: Path, text: str, document_split: str) -> Iterator[SourceRow]:
    if document_split == "file":
        yield SourceRow({"text": text}, str(path), "line", 1)
        return
    start = 0
    for separator in [*_BLANK_LINES.finditer(text), None]:
        end = separator.start() if separator else len(text)
        block = text[start:end]
        if block.strip():
            leading = len(block) - len(block.lstrip())
            line = text.count("\n", 0, start + leading) + 1
            yield SourceRow({"text": block.strip()}, str(path), "line", line)
        if separator:
            start = separator.end()


def _parquet_rows(path: Path) -> list[SourceRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: cannot read it as Parquet ({err})") from None
    return [SourceRow(values, str(path), "row", index) for index, values in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str) -> list[SourceRow]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"dataset source {name} is not a local path, so it is read as a Hugging Face dataset, "
            "which needs the datasets library: pip install datasets (or pip install 'tunelite[datasets]')"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, auth and missing-split failures all surface here
        raise DataError(f"cannot load Hugging Face dataset {name} (split {split!r}): {err}") from err
    rows = [SourceRow(values, f"{name} [{split}]", "row", index) for index, values in enumerate(data)]
    if not rows:
        raise DataError(f"Hugging Face dataset {name} (split {split!r}) holds no rows")
    return rows
