"""Reading files that come from elsewhere (configs, config.json, adapter configs, manifests,
tokenizer files) within bounds, so a damaged or hostile file costs an error, not the machine.
A room of its own at the bottom, beside `errors`: every room reads such files.

Each kind has a generous cap, checked on the file's size before a byte is read; lines are read
in bounded pieces, so a 2 GiB line is refused after reading its first few kilobytes.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelite.errors import TuneliteError

MIB = 2**20
# The largest real files of each kind are far below these: a config is a few KB, Llama 3's
# config.json 1 KB, a 405B model's safetensors index 100 KB, Llama 3's tokenizer.model 2 MB, the
# largest tokenizer.json we know (Gemma 3's) 33 MB.
MAX_CONFIG_BYTES = 4 * MIB
MAX_JSON_BYTES = 16 * MIB
MAX_TOKENIZER_BYTES = 256 * MIB
# What `tunelite download` writes beside a model folder's files: the repo and commit they came
# from, which adapters trained on the folder name as their base.
SOURCE_RECORD = "tunelite_source.json"


def _size(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size} bytes"


def check_size(path: str | Path, limit: int, what: str, error: type[TuneliteError] = TuneliteError) -> Path:
    """`path` as a Path, after checking it is a file of at most `limit` bytes; the error names the
    file, what it should be, its size and the cap."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as problem:
        raise error(f"{what} {path} cannot be read ({problem.strerror or problem})") from None
    if not path.is_file():
        raise error(f"{what} {path} is not a file")
    if size > limit:
        raise error(f"{what} {path} is {_size(size)}, over the {_size(limit)} a {what} may be; it is not "
                    f"a {what}, or it is damaged")
    return path


def read_bounded(path: str | Path, limit: int, what: str, error: type[TuneliteError] = TuneliteError) -> bytes:
    """The bytes of a file of at most `limit` bytes, read only once its size is known to fit; a file
    growing while it is read is cut at the cap and refused too."""
    path = check_size(path, limit, what, error)
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as problem:
        raise error(f"{what} {path} cannot be read ({problem.strerror or problem})") from None
    if len(data) > limit:
        raise error(f"{what} {path} grew past the {_size(limit)} a {what} may be while it was read")
    return data


def read_json(path: str | Path, what: str, error: type[TuneliteError] = TuneliteError,
              limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of at most `limit` bytes, parsed; invalid JSON is named with its line."""
    path = Path(path)
    try:
        return json.loads(read_bounded(path, limit, what, error))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{what} {path} is not valid JSON ({problem}); restore or re-download it") from None


def bounded_lines(path: str | Path, max_line: int, what: str, error: type[TuneliteError] = TuneliteError,
                  limit: int = MAX_TOKENIZER_BYTES) -> Iterator[bytes]:
    """The lines of a file (without their line ends), each read in a piece of at most `max_line`
    bytes: a longer line is refused by its number before the rest of it is read."""
    path = check_size(path, limit, what, error)
    with open(path, "rb") as file:
        for number, line in enumerate(iter(lambda: file.readline(max_line + 1), b""), start=1):
            if len(line) > max_line and not line.endswith(b"\n"):
                raise error(f"{what} {path}: line {number} is longer than {max_line} bytes; it is not a {what}, "
                            "or it is damaged")
            yield line.rstrip(b"\r\n")


__all__ = ["MAX_CONFIG_BYTES", "MAX_JSON_BYTES", "MAX_TOKENIZER_BYTES", "bounded_lines", "check_size",
           "read_bounded", "read_json"]
