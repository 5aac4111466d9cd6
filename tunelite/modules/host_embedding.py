"""A frozen token embedding kept in pinned host memory, which the GPU reads in place.

An embedding is a lookup: a step reads only its tokens' rows (32 MiB for 4,096 tokens of Llama
3.1 8B) of a table that holds 1 GiB (128,256 x 4,096 in bf16). When the table is frozen (LoRA,
QLoRA) it need not sit on the card. In pinned host memory it is mapped into the GPU's address space
(unified addressing: a pinned allocation's host pointer is valid on the device), so the embedding's
gather kernel reads the rows it needs across the bus: no copy of the table, no round trip through
the host, no synchronisation. The gigabyte it frees is the card's for activations, where a memory
budget keeps whole layers that it would otherwise recompute (docs/benchmarks.md).
"""

import ctypes

import torch
import torch.nn.functional as F
import torch.utils.dlpack
from torch import nn

from tunelite.errors import ConfigError
from tunelite.runtime.host import require_host_memory

# A DLPack capsule holds a DLManagedTensor, whose DLTensor starts with the data pointer (8 bytes) and
# then the device: an int32 type (kDLCUDA = 2) and an int32 index (dlpack.h; a stable ABI).
_DEVICE_TYPE_AT, _DEVICE_INDEX_AT, _KDLCUDA = 8, 12, 2


def dlpack_device_fields(capsule: object) -> tuple[ctypes.c_int32, ctypes.c_int32]:
    """The device type and index fields of a (legacy, "dltensor") DLPack capsule, writable in place."""
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, (ctypes.py_object, ctypes.c_char_p)
    managed = get_pointer(capsule, b"dltensor")
    return ctypes.c_int32.from_address(managed + _DEVICE_TYPE_AT), ctypes.c_int32.from_address(managed + _DEVICE_INDEX_AT)


def device_view(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`table` (in pinned host memory) as a tensor on the GPU `device` over the same memory; on the
    CPU, `table` itself. torch has no call for this: the table's DLPack capsule is relabelled as the
    GPU's, and the tensor made from it keeps the table alive through the capsule's deleter."""
    if device.type == "cpu":
        return table
    capsule = torch.utils.dlpack.to_dlpack(table)
    kind, index = dlpack_device_fields(capsule)
    kind.value, index.value = _KDLCUDA, torch.cuda.current_device() if device.index is None else device.index
    return torch.from_dlpack(capsule)


class HostEmbedding(nn.Module):
    """nn.Embedding's lookup over a frozen table in pinned host memory; `weight` keeps its name,
    so state dicts, checkpoints and merged exports are unchanged. Token ids on the GPU are looked
    up by the GPU through the mapped table; on the CPU, in the table itself (where the CPU runs
    this same code: tests, the tiny demo)."""

    def __init__(self, weight: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        table = weight.detach().to("cpu").contiguous()
        self.weight = nn.Parameter(table.pin_memory() if device.type == "cuda" else table, requires_grad=False)
        self.mapped = device_view(self.weight.detach(), device)  # a plain attribute: not a second parameter
        rows = torch.tensor([0, table.shape[0] // 2, table.shape[0] - 1])
        if not torch.equal(F.embedding(rows.to(device), self.mapped).cpu(), F.embedding(rows, table)):
            raise RuntimeError(f"offload_embeddings: {device} reads other values than the host table holds; "
                               "set offload_embeddings: False")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.mapped if tokens.device == self.mapped.device else self.weight)


def check_offloadable(tied: bool, trains: bool) -> None:
    """Refuses a table that cannot stay in host memory: one that trains, or that is also the output
    projection (tied embeddings), which every step reads whole on the GPU."""
    if tied:
        raise ConfigError("offload_embeddings: this model's output projection is its embedding table (tied "
                          "embeddings), which every step reads whole on the GPU; set offload_embeddings: False")
    if trains:
        raise ConfigError("offload_embeddings: the embedding table trains in this recipe; only a frozen table "
                          "can stay in host memory: set offload_embeddings: False")


def offload_embeddings(model: nn.Module, device: torch.device) -> int:
    """Moves `model.tok_embeddings`'s table to pinned host memory, read in place by the CUDA GPU
    `device` (or, on the CPU, by the CPU); returns the bytes the card no longer holds."""
    embedding = model.tok_embeddings
    check_offloadable(model.args.tie_word_embeddings, embedding.weight.requires_grad)
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"offload_embeddings: needs a CUDA GPU, which maps host memory, not {device.type}; "
                          "set offload_embeddings: False")
    if isinstance(embedding, HostEmbedding):
        return 0
    size = embedding.weight.numel() * embedding.weight.element_size()
    if device.type == "cuda":
        require_host_memory(size, "offload_embeddings", "Set offload_embeddings: False", pinned=True)
    model.tok_embeddings = HostEmbedding(embedding.weight, device)
    return size if device.type == "cuda" else 0
