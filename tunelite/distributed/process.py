"""The process group a distributed recipe runs in, and the few collective operations shared code needs.

Every helper also works in a plain single process, where it does nothing, so the shared loop and
checkpoint code call them unconditionally instead of branching on whether torchrun started them.
"""

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from tunelite.errors import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


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


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Lets a sharded model skip reducing gradients across ranks on all but the last micro-batch of
    a step (they accumulate locally instead); a no-op for an unsharded model."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[torch.device, int, int]]:
    """Joins the process group torchrun set up, for the duration of the block: NCCL with one GPU per
    process (cuda:LOCAL_RANK) for a GPU device, gloo for the CPU. Yields (this process's device,
    rank, world_size)."""
    if "RANK" not in os.environ:
        raise ConfigError(
            "this recipe runs under torchrun: launch it with `tunelite run <recipe> --nproc_per_node N "
            "--config ...` (add --nnodes, --node_rank and --master_addr for several machines)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()
