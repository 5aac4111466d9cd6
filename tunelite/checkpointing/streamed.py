"""safetensors files read and written one tensor (or one block of rows) at a time.

A merge or an export of a 70B model must not need the model in host memory, nor even one
5 GB shard. Opening a file memory-maps it whole, and every page read through the mapping then
counts in the process's memory until the file is closed, so each tensor (or block of rows) is
read through a handle of its own that closes with it. The writer takes the header first
(names, dtypes, shapes) and the data afterwards as a stream of row blocks, so nothing but the
block in hand is held.
"""

import json
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tunelite.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Rows per block when a tensor is streamed: ~4M values, 16 MiB in fp32. Small blocks bound what
# a fold holds (the block and a few fp32 temporaries of it), however large the tensor.
BLOCK_VALUES = 1 << 22


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, known from the header alone."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def list_tensors(path: Path) -> list[TensorEntry]:
    """The tensors of a file in stored order, from its header: no data is read."""
    try:
        with safe_open(path, framework="pt") as f:
            entries = []
            for name in f.keys():
                view = f.get_slice(name)
                if view.get_dtype() not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has dtype {view.get_dtype()}, which tunelite "
                                          "does not read")
                entries.append(TensorEntry(Path(path), name, _DTYPES[view.get_dtype()], tuple(view.get_shape())))
            return entries
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} cannot be read as safetensors ({e}); the file is truncated or corrupt") from e


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, memory-mapped through its own handle, so its pages leave memory with it."""
    try:
        with safe_open(entry.file, framework="pt") as f:
            return f.get_tensor(entry.name)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{entry.file} cannot be read as safetensors ({e}); the file is truncated or "
                              "corrupt") from e


def block_rows(shape: tuple[int, ...], block_values: int = BLOCK_VALUES) -> int:
    """How many rows (dim 0) of a tensor of this shape make a block of about `block_values` values."""
    return max(1, block_values // max(1, math.prod(shape[1:]))) if shape else 1


def read_row_blocks(entry: TensorEntry) -> Iterator[tuple[int, torch.Tensor]]:
    """The tensor as (first row, block of `block_rows` rows), each block read through a handle of
    its own: however large the tensor (a 2 GiB lm_head), memory holds one block of it."""
    if len(entry.shape) == 0 or math.prod(entry.shape) == 0:
        yield 0, read_tensor(entry)
        return
    rows = block_rows(entry.shape)
    for start in range(0, entry.shape[0], rows):
        try:
            with safe_open(entry.file, framework="pt") as f:
                block = f.get_slice(entry.name)[start:start + rows]
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{entry.file} cannot be read as safetensors ({e}); the file is truncated or "
                                  "corrupt") from e
        yield start, block


def write_safetensors(
    path: Path, header: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], data: Iterable[Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file whose tensors are `header`'s (name, dtype, shape), in that order;
    `data` yields, per tensor, its row blocks in order, each written as it comes."""
    spec: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in header:
        end = offset + math.prod(shape) * dtype.itemsize
        spec[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(spec, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        blocks_per_tensor = iter(data)
        for name, dtype, shape in header:
            written = 0
            for block in next(blocks_per_tensor):
                assert block.dtype == dtype, (name, block.dtype, dtype)
                f.write(block.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
                written += block.numel() * block.element_size()
            assert written == math.prod(shape) * dtype.itemsize, f"{name}: wrote {written} bytes"
