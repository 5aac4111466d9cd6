"""FSDP2 for a LoRA model or a full fine-tune: shard it while it is still on the meta device, fill
each rank's shards from the checkpoint, and gather whole tensors back for saving.

Each rank holds 1/N of every weight, the frozen base included, and all-gathers one transformer
layer at a time for its forward and backward; the gradients of what trains are summed across
ranks (reduce-scatter), so every rank steps its shard of the same weights. With `shard_frozen`
False, the frozen weights are left out of FSDP (its `ignored_params`): each rank holds them whole,
as plain tensors, and what trains (LoRA's adapters, a few tens of MB) is one FSDP unit, gathered
once at the forward's start and reduced once at the backward's end: data parallelism, with two
collectives a step instead of three a layer.
"""

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.loading import assign_checkpoint, load_fitting, nf4_weight_names
from tunelite.models.llama import TransformerDecoder
from tunelite.modules.lora import ADAPTER_SUFFIXES, LoRALinear
from tunelite.modules.nf4 import dequantize, quantize_nf4
from tunelite.errors import CheckpointError
from tunelite.runtime.ranks import gather_objects, is_main_process
from tunelite.runtime.shards import local_shard


def init_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Gives the adapters of a meta-device model their initial values, on the CPU, drawn from the
    global RNG in module order exactly as the single-device loader draws them: after the same
    seed every rank holds the same adapters, and on the CPU the single-device recipe's. (Drawn
    after sharding, through DTensor's own RNG, they would differ from the single-device ones.)"""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for name in ADAPTER_SUFFIXES:
                old = getattr(module, name)
                setattr(module, name, nn.Parameter(torch.empty_like(old, device="cpu", dtype=dtype), old.requires_grad))
            module.reset_parameters()


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """The dtypes FSDP gathers parameters and reduces gradients in: in bf16, parameters are gathered
    in bf16 and gradients summed across ranks in fp32 (a sum of many ranks' bf16 gradients loses
    their low bits); other dtypes as stored. The memory estimate reads the same policy."""
    if dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(
    model: TransformerDecoder, device: torch.device, dtype: torch.dtype, reshard_after_forward: bool,
    cpu_offload: bool = False, shard_frozen: bool = True,
) -> None:
    """fully_shard each transformer layer, then the root (embedding, final norm, output projection).

    The root stays gathered from `hidden_states` until its backward, since the loss applies the
    output projection after `hidden_states` returns. Gradients are summed across ranks, not
    averaged: each rank's loss is already divided by the labelled tokens of the whole global batch,
    so the sum is the single-device gradient. Parameters are gathered, and gradients reduced, in
    the dtypes of `mixed_precision`. With `cpu_offload` (FSDP2's CPUOffloadPolicy) the shards
    and their gradients live in pinned host memory, so the optimizer's state does too and it
    steps on the CPU; each layer's shards are copied to the GPU to be gathered.

    With `shard_frozen` False, the parameters that do not require gradients (set before this is
    called) stay whole on every rank and are never gathered: no weight all-gathers of the frozen
    base, for as much memory as one device holds it in. FSDP neither moves nor casts them, so the
    loader gives them the training dtype and device. What trains is then the root's alone, one
    unit, two collectives a step: with a unit per layer (three collectives a layer, each a point
    where the ranks wait for one another) two H200s ran 1.45-1.60x one GPU, with one unit 2.06x
    (docs/benchmarks.md)."""
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    mp_policy = mixed_precision(dtype)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    # None, not an empty set, when everything is sharded: fully_shard then manages every submodule as before.
    ignored = None if shard_frozen else {p for p in model.parameters() if not p.requires_grad}
    for layer in model.layers if shard_frozen else ():
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=False,
                ignored_params=ignored)
    register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain sum: gloo has no pre-multiplied sum, and NCCL's sum needs no extra scaling pass.
            module.set_force_sum_reduction_for_comms(True)


def load_sharded_checkpoint(
    model: nn.Module, checkpointer: HFCheckpointer, device: torch.device, dtype: torch.dtype
) -> None:
    """Fills a sharded meta-device model from the checkpoint: every rank reads the memory-mapped
    files and keeps its own rows of each tensor, cut on the CPU, so no GPU ever holds more than
    its shards; a weight shard_model left whole (`shard_frozen` False) is kept whole. QLoRA weights
    are quantized whole, one tensor at a time on the device, and then cut: NF4's scales are
    computed over the whole tensor. One left whole is quantized as on one device (and never given
    a dtype after: NF4Tensor.to(dtype) dequantizes)."""
    world_size = torch.distributed.get_world_size()
    quantized = nf4_weight_names(model)
    shards = model.state_dict()
    state = {}
    for key, value in load_fitting(model, checkpointer).items():
        like = shards.get(key)
        if key in quantized and isinstance(like, DTensor):
            state[key] = local_shard(quantize_nf4(value.to(device=device, dtype=dtype), shards=world_size), like)
        elif key in quantized:
            state[key] = quantize_nf4(value.to(device=device, dtype=dtype))
        else:
            state[key] = local_shard(value, like, device, dtype)
    assign_checkpoint(model, state, checkpointer.checkpoint_dir, device, dtype)


def reshard(model: nn.Module) -> None:
    """Frees every gathered parameter and registers the shards again, as after a training step.
    A forward without backward (validation) leaves the root gathered; saving needs the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_full_state_dict(model: nn.Module, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The kept tensors whole, on the CPU and NF4 dequantized, on rank 0; an empty dict on the other
    ranks. Every rank must call it: each sharded tensor is all-gathered, one at a time, so gathering
    the adapters moves only them, not the base weights. A tensor shard_model left whole is already
    whole on rank 0 and moves nowhere."""
    reshard(model)
    gathered = {}
    for key, value in model.state_dict().items():
        if not keep(key):
            continue
        if isinstance(value, DTensor):
            local = dequantize(value.to_local())
            value = DTensor.from_local(local, value.device_mesh, value.placements, shape=value.shape,
                                       stride=value.stride()).full_tensor()
        if is_main_process():
            gathered[key] = dequantize(value).detach().cpu()
    return gathered


class ShardedOptimizer:
    """An optimizer over a sharded model whose checkpoint state is the whole, unsharded one, keyed by
    parameter name: gathered to rank 0 on save, cut back into each rank's shards on load. The file
    then reads like a single-device one and does not depend on how the model was split.

    It offers what the loop and the LR schedule use (`param_groups`, `step`, `zero_grad`,
    `state_dict`, `load_state_dict`); `state_dict` must be called on every rank."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        # Looked up each time: loading a state replaces the optimizer's list, and the LR schedule
        # must set the rate in the list the optimizer steps with.
        return self.optimizer.param_groups

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        reshard(self.model)
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))


class ShardedStateOptimizer:
    """An optimizer over a sharded model whose state each rank writes itself, its own shards, with
    torch.distributed.checkpoint (`save_shards`), so that no process ever holds all of it: for a
    full fine-tune that is twice the model (280 GB for 70B in bf16), where ShardedOptimizer's
    gathering to rank 0 suits LoRA's adapters. `state_dict()`, which goes into recipe_state.pt,
    holds the hyperparameters and says where the tensors are; `load_shards` reads the tensors back,
    resharded if the model was split otherwise, and `load_state_dict` the hyperparameters, as any
    optimizer's, so that a resumed run's changed settings are applied as they are elsewhere.

    It offers what the loop and the LR schedule use (`param_groups`, `step`, `zero_grad`,
    `state_dict`, `load_state_dict`)."""

    FOLDER = "optimizer"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups  # looked up each time, as ShardedOptimizer's

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"shards": self.FOLDER, "param_groups": self.optimizer.state_dict()["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved hyperparameters (learning rate, betas, ...); the tensors are read by load_shards."""
        if state.get("shards") != self.FOLDER:
            raise ValueError(f"this optimizer's state was saved whole, not in shards under {self.FOLDER}/")
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})

    def save_shards(self, folder: Path | None) -> None:
        """Every rank writes its shards of the moments and step counts into `folder`/optimizer, the
        folder rank 0 was given (the other ranks are given None): one file per rank, and rank 0 adds
        the metadata once every rank's file is written, so the folder is whole when this returns on
        rank 0."""
        target = Path(gather_objects(folder)[0]) / self.FOLDER
        dcp.save({"state": get_optimizer_state_dict(self.model, self.optimizer)["state"]}, checkpoint_id=target)

    def load_shards(self, folder: Path) -> None:
        """Every rank reads its shards of the tensors `save_shards` wrote into `folder`; the
        hyperparameters stay as configured until `load_state_dict`."""
        source = Path(folder) / self.FOLDER
        state = get_optimizer_state_dict(self.model, self.optimizer)  # the layout to read into
        tensors = {"state": state["state"]}
        try:
            dcp.load(tensors, checkpoint_id=source)
        except (CheckpointException, OSError, RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{source}: the optimizer state cannot be read into this model's shards "
                                  f"({type(error).__name__}: {str(error)[:300]})") from error
        set_optimizer_state_dict(self.model, self.optimizer, {**tensors, "param_groups": state["param_groups"]})
