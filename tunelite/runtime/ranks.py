"""Which process of a distributed run this is, and the few collective operations shared code needs.

Every helper also works in a plain single process, where it does nothing, so loop, checkpoint
and loading code call them unconditionally instead of branching on whether torchrun started them.
"""

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and shows the progress bar."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces GPU tensors only; gloo takes CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over every rank, on `value`'s device: a step's labelled tokens or its loss
    over the global batch rather than this rank's share of it."""
    if not is_distributed():
        return value
    total = value.to(_collective_device())
    dist.all_reduce(total)
    return total.to(value.device)


def max_over_ranks(value: int) -> int:
    """The largest of every rank's `value`: e.g. whether any rank was asked to stop."""
    if not is_distributed():
        return value
    largest = torch.tensor(value, device=_collective_device())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return int(largest.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable Python objects, e.g. RNG states)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable Python object): a decision rank 0 alone can make,
    such as whether the output folder may be used, that every rank must then act on alike."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
