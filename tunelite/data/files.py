"""Reads rows from a user's local data file, naming the file and line of anything malformed."""

import json
from pathlib import Path
from typing import Any

from tunelite.errors import DataError


def read_json_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `.json` (a list of objects) or `.jsonl` (one object per line) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset source {path} does not exist; give the path of a .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path} is empty: a dataset needs at least one row")
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: malformed JSON ({e.msg}); each line must be one JSON object") from e
    elif path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got a {type(rows).__name__}")
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r}; accepted: .json, .jsonl")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {i}: expected a JSON object, got {type(row).__name__}")
    return rows
