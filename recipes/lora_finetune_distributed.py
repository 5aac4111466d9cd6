"""LoRA (and QLoRA) fine-tuning of a Llama model over several GPUs, or CPU processes, with FSDP2.

    tunelite run lora_finetune_distributed --nproc_per_node 8 --config llama3_1/70B_lora
    tunelite run lora_finetune_distributed --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
        --nproc_per_node 8 --config llama3_1/70B_lora          # and --node_rank 1 on the second machine

What makes this distributed: every process holds 1/N of each weight, the frozen base included,
and gathers one layer at a time to run it; it takes its own `batch_size` samples of each global
batch of N x batch_size. Each step divides the loss by the labelled tokens of the whole global
batch and sums the gradients across processes, so a step is the single-device recipe's step on
that global batch. The model is built as torchtitan builds it: on the meta device, sharded
layer by layer, then filled from the checkpoint, each process reading only its rows. Rank 0
logs and writes the checkpoints, in the single-device recipe's layout.
"""

from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.peft import load_adapter_into, save_peft_adapter
from tunelite.config import instantiate, recipe_entry
from tunelite.distributed.process import process_group
from tunelite.distributed.sharding import (
    ShardedOptimizer,
    gather_full_state_dict,
    init_adapters,
    load_sharded_checkpoint,
    shard_model,
)
from tunelite.models.llama import set_activation_checkpointing
from tunelite.modules.lora import is_adapter_key, merged_state_dict, set_trainable_params
from tunelite.training import StepLoop, build_loss, optimizer_step, setup_run
from tunelite.training.device import get_device
from tunelite.training.model_loading import compile_layers


def main(cfg: DictConfig) -> None:
    with process_group(get_device(cfg.device)) as (device, rank, world_size):
        train(cfg, device, rank, world_size)


def train(cfg: DictConfig, device: torch.device, rank: int, world_size: int) -> None:
    run = setup_run(cfg, device, rank, world_size)  # this rank's share of each batch; loggers on rank 0
    checkpointer = instantiate(cfg.checkpointer)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    init_adapters(model, run.dtype)  # from the seeded RNG, before sharding: the same on every rank
    set_trainable_params(model)
    shard_model(model, run.device, run.dtype, cfg.fsdp_reshard_after_forward)
    load_sharded_checkpoint(model, checkpointer, run.device, run.dtype)
    set_activation_checkpointing(model, 1 if cfg.enable_activation_checkpointing else 0)
    if cfg.compile:
        compile_layers(model)
    optimizer = ShardedOptimizer(model, instantiate(cfg.optimizer, [p for p in model.parameters() if p.requires_grad]))
    loss_fn = build_loss(cfg.loss, cfg.compile)

    def write_adapter(folder: Path | None) -> None:
        """Every rank gathers (collectives); rank 0, the only one handed a folder, writes."""
        adapter = gather_full_state_dict(model, keep=is_adapter_key)
        if folder is not None:
            save_peft_adapter(model, folder / "adapter", str(checkpointer.checkpoint_dir), adapter)
        if cfg.save_merged_model and loop.is_last_step:
            full = gather_full_state_dict(model)  # the whole model in host memory, on rank 0 only
            if folder is not None:
                checkpointer.save(merged_state_dict(model, full), folder / "model")

    def restore_adapter(folder: Path) -> None:
        load_adapter_into(model, folder / "adapter")  # each rank copies its rows of the saved adapter

    with StepLoop(cfg, run, model, loss_fn, optimizer, write_adapter, restore_adapter, world_size) as loop:
        for window, num_labels in loop.windows():  # num_labels: over all ranks' micro-batches
            loss, grad_norm = optimizer_step(model, loss_fn, window, num_labels, optimizer, cfg.clip_grad_norm)
            loop.step_done(loss, grad_norm)
    if rank == 0:
        merged = f", {loop.last_checkpoint / 'model'} (merged, HF layout)" if cfg.save_merged_model else ""
        print(f"done on {world_size} processes: {loop.last_checkpoint / 'adapter'} (peft layout){merged}")


if __name__ == "__main__":
    recipe_entry(main)
