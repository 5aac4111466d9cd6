"""Whole tensors and the row shards `fully_shard` keeps of them on each rank."""

import torch
from torch.distributed.tensor import DTensor, Shard


def local_shard(
    full: torch.Tensor, like: torch.Tensor | None, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`full` as `like` holds it: when fully_shard split `like`, this rank's rows of `full` (torch.chunk's
    split, as fully_shard's), cut before they move to `device` so that only they ever reach it; else
    `full` itself, moved. Loading a checkpoint or an adapter into a sharded model goes through here."""
    if not isinstance(like, DTensor):
        return full.to(device=device, dtype=dtype)
    assert tuple(like.placements) == (Shard(0),), f"fully_shard splits rows, not {like.placements}"
    mesh = like.device_mesh
    rows = full.chunk(mesh.size(), dim=0)
    rank = mesh.get_local_rank()
    piece = rows[rank] if rank < len(rows) else full[:0]
    return DTensor.from_local(piece.to(device=device, dtype=dtype), mesh, like.placements,
                              shape=full.shape, stride=full.stride())
