"""The memory plan a training run applies: torchtune's two switches, or the fastest that fits a budget.

Without `memory_budget_gib`, every layer gets the policy of enable_activation_checkpointing and
enable_activation_offloading, as in torchtune. With it, the memory model of `tunelite estimate`
(tunelite.training.memory_estimate, the one and only copy) picks the plan: the fewest layers
recomputed, then the fewest offloaded, such that the predicted peak fits the budget. Either way,
a plan that offloads is checked against the machine's available host memory before anything runs.
"""

from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.errors import ConfigError
from tunelite.modules.memory_policy import offloads
from tunelite.runtime.host import MEMINFO, require_host_memory
from tunelite.training.memory_estimate import (
    GIB,
    MemoryEstimate,
    MemoryModel,
    MemoryPlan,
    gib,
    memory_facts,
    memory_model,
    switches_plan,
)


def budget_bytes(budget: float | str, device: torch.device) -> int | None:
    """memory_budget_gib in bytes: a number of GiB, or `auto`, the card's whole memory (None when
    the run has no GPU). Counted as `tunelite estimate` counts a card: CUDA context and allocator
    reserve included."""
    if budget == "auto":
        return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = 0.0
    if value <= 0:
        raise ConfigError(f"memory_budget_gib: {budget!r} is not a memory size; give GiB (e.g. 22) or auto "
                          "(the GPU's memory)")
    return int(value * GIB)


def plan_memory(cfg: DictConfig, memory: dict, num_layers: int, device: torch.device, checkpointing: bool,
                offloading: bool, budget: float | str | None, meminfo: Path = MEMINFO,
                world_size: int = 1) -> MemoryPlan:
    """The plan for `set_memory_policy`: the switches', or with `budget` (memory_budget_gib) the
    fastest the estimate fits in it (the leanest, with a warning, when none does). `memory`: the
    recipe's MEMORY declaration. `world_size`: the processes a distributed recipe shards the model
    over with FSDP2, so that the budget is each GPU's and the estimate each GPU's share. Prints the
    plan and, when it offloads, the pinned host memory it takes; raises ResourceError when the
    host lacks that memory."""
    plan = switches_plan(num_layers, checkpointing, offloading)
    card = budget_bytes(budget, device) if budget is not None else None
    if budget is not None and card is None:
        print(f"memory_budget_gib: auto has no GPU to size on {device.type}; using the switches' plan")
    if card is None and not any(offloads(policy) for policy in plan.layers):
        return plan
    model = memory_model(cfg, memory_facts("this recipe", memory), world_size)
    plan, fits = budget_plan(model, plan, card)
    estimate = model.estimate(plan)
    if not fits:
        print(f"memory_budget_gib: no memory policy fits batch {model.batch} x {model.seq} tokens in {gib(card)} "
              f"by the estimate; running the leanest, which needs {gib(estimate.total)}. If it runs "
              "out of memory, lower batch_size or tokenizer.max_seq_len, or use a QLoRA config")
    print(describe_plan(plan, estimate, model.batch * model.seq))
    what = "offloading activations" + (" and the embedding table" if estimate.host_weights else "")
    require_host_memory(estimate.pinned_host, what,
                        "Offload fewer layers (set enable_activation_offloading: False, or memory_budget_gib to the "
                        "card's size so only what must be offloaded is), or shorten tokenizer.max_seq_len",
                        meminfo, pinned=True)
    return plan


def budget_plan(model: MemoryModel, switches: MemoryPlan, budget: int | None) -> tuple[MemoryPlan, bool]:
    """The plan a run applies, and whether the estimate says it fits: without a budget the switches'
    plan; with one (bytes on the card) the fastest plan that fits it, or, where none does, the
    leanest (the estimate's allocator reserve is cautious, so it may still run). `tunelite
    estimate` reports the plan this picks."""
    if budget is None:
        return switches, True
    found = model.fastest_plan(budget)
    if found is None:
        return switches_plan(model.args.num_layers, checkpointing=True, offloading=True), False
    return found[0], True


def describe_plan(plan: MemoryPlan, estimate: MemoryEstimate, tokens: int) -> str:
    """The line a run logs about its plan."""
    host = (f", {gib(estimate.host_bytes)} of pinned host memory for offloaded activations"
            if estimate.host_bytes else "")
    if estimate.host_weights:
        host += f", {gib(estimate.host_weights)} for the embedding table"
    return (f"memory policy: {plan.describe(tokens)}; predicted peak {gib(estimate.peak_allocated)} allocated, "
            f"{gib(estimate.total)} on the card{host}")
