"""The process group a distributed recipe runs in, and FSDP's switch for gradient accumulation.

The rank queries and collectives that shared code uses in any process live one room down, in
tunelite.runtime.ranks.
"""

import contextlib
import gc
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from tunelite.errors import ConfigError


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
        # Every rank done before any tears its connections down: a rank that leaves while another
        # still finishes (rank 0 writing the last checkpoint) can abort that rank's gloo threads.
        dist.barrier()
    finally:
        # FSDP2's modules hold the group through their device mesh, in reference cycles that only the
        # collector frees: freed at interpreter exit instead, gloo's threads abort the process.
        gc.collect()
        dist.destroy_process_group()
