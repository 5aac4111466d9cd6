"""Full fine-tuning of a Llama model over several GPUs, or CPU processes, with FSDP2.

    tunelite run full_finetune_distributed --nproc_per_node 8 --config llama3_1/8B_full
    tunelite run full_finetune_distributed --nproc_per_node 8 --config llama3_1/70B_full

What makes this distributed: every process holds 1/N of each weight, of its gradient and of the
optimizer's state, and gathers one layer at a time to run it; it takes its own `batch_size`
samples of each global batch of N x batch_size. Each step divides the loss by the labelled tokens
of the whole global batch and sums the gradients across processes, so a step is the single-device
recipe's step on that global batch. The model is built as torchtitan builds it: on the meta
device, sharded layer by layer, then filled from the checkpoint, each process reading only its
rows. With `fsdp_cpu_offload` the shards, their gradients and the optimizer's state live in host
memory and AdamW steps on the CPU (FSDP2's CPUOffloadPolicy): what makes 70B fit 8 GPUs.

Checkpoints: the whole model gathered to rank 0, one tensor at a time, and written in the base
checkpoint's Hugging Face layout, in the training dtype so that a resumed run continues from
exactly these weights; the optimizer's state written by every process, its own shards, with
torch.distributed.checkpoint into the same folder (optimizer/), so that no process holds all of it.

The loop in `train` below is full_finetune_single_device's with the lines distribution adds:
the gradient sync on the last micro-batch only, the step's loss summed over ranks, and the
weights gathered from every rank before rank 0 writes them.
"""

import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.hf import HFCheckpointer
from tunelite.checkpointing.output_dir import RunFolder, claim_output_dir
from tunelite.checkpointing.state import (
    Progress,
    checkpoint_lacks,
    load_training_state,
    run_fingerprint,
    save_checkpoint,
)
from tunelite.config import instantiate, recipe_entry
from tunelite.data.collate import padded_collate
from tunelite.data.loader import build_dataloader, epoch_batches, labelled_tokens, step_sample_indices, steps_per_epoch
from tunelite.distributed.process import process_group, set_gradient_sync
from tunelite.distributed.sharding import (
    ShardedStateOptimizer,
    gather_full_state_dict,
    load_sharded_checkpoint,
    shard_model,
)
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.modules.memory_policy import set_memory_policy
from tunelite.runtime.device import get_device, get_dtype, reset_peak_memory
from tunelite.runtime.ranks import sum_over_ranks
from tunelite.runtime.seed import set_seed
from tunelite.training.compile import compile_layers
from tunelite.training.divergence import diverged
from tunelite.training.memory_policy import plan_memory
from tunelite.training.nonfinite import is_finite, skip_or_stop
from tunelite.training.oom import advice_on_oom
from tunelite.training.profiling import build_profiler
from tunelite.training.reporting import StepReporter, build_metric_loggers
from tunelite.training.signals import StopRequest
from tunelite.training.validation import validation_loss

# Every config key this recipe reads: `tunelite validate` and `run` refuse a config with any other
# (naming it and a close match) or without a required one. A copy that reads a new key adds it here.
CONFIG_KEYS = {
    "required": (
        "output_dir", "model", "tokenizer", "checkpointer", "dataset", "optimizer", "lr_scheduler", "loss",
        "metric_logger", "seed", "shuffle", "batch_size", "epochs", "gradient_accumulation_steps", "device", "dtype",
        "compile", "enable_activation_checkpointing", "log_every_n_steps",
    ),
    "optional": (
        "val_dataset", "profiler", "max_steps_per_epoch", "clip_grad_norm", "skip_nonfinite_steps",
        "eval_every_n_steps", "save_every_n_steps", "keep_last_n_checkpoints", "resume_from_checkpoint",
        "log_peak_memory_stats", "fsdp_reshard_after_forward", "fsdp_cpu_offload", "overwrite_output_dir",
        "divergence_factor", "enable_activation_offloading", "memory_budget_gib",
    ),
}
# What `tunelite estimate` needs to know of this recipe: every weight trains, one sequence a sample.
MEMORY = {"trains": "all", "sequences_per_sample": 1}


def main(cfg: DictConfig) -> None:
    with process_group(get_device(cfg.device)) as (device, rank, world_size):
        # The output folder is this run's alone while it runs: rank 0 takes it, or refuses, for all ranks.
        with claim_output_dir(Path(cfg.output_dir), cfg.get("resume_from_checkpoint", False),
                              cfg.get("overwrite_output_dir", False)) as run:
            train(cfg, run, device, rank, world_size)


def train(cfg: DictConfig, run: RunFolder, device: torch.device, rank: int, world_size: int) -> None:
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    logger = build_metric_loggers(cfg.metric_logger, rank)  # rank 0 alone logs
    logger.log_config(cfg)

    # Data: this rank's share of each global batch, in an order a resumed run can reproduce.
    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer)
    collate = partial(padded_collate, pad_id=tokenizer.pad_id)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.shuffle, cfg.seed, collate, rank, world_size)
    val_loader = None
    if cfg.get("val_dataset") or cfg.dataset.get("val_fraction"):
        # A dataset of its own, or the held-out share of the training source.
        val_set = (instantiate(cfg.val_dataset, tokenizer) if cfg.get("val_dataset")
                   else instantiate(cfg.dataset, tokenizer, partition="validation"))
        val_loader = build_dataloader(val_set, cfg.batch_size, False, cfg.seed, collate, rank, world_size,
                                      drop_last=False)
    accumulation = cfg.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(loader, accumulation, cfg.get("max_steps_per_epoch"))
    total_steps = epoch_steps * cfg.epochs

    # The model: built on the meta device, sharded layer by layer, then each rank fills its rows from
    # the base checkpoint or, when resuming, from the checkpoint's model (HF layout, training dtype).
    checkpointer = instantiate(cfg.checkpointer)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    shard_model(model, device, dtype, cfg.get("fsdp_reshard_after_forward", True), cfg.get("fsdp_cpu_offload", False))
    load_sharded_checkpoint(model, HFCheckpointer(str(run.resume / "model")) if run.resume else checkpointer, device,
                            dtype)
    # What each layer keeps for backward: the switches' policy, or the fastest that fits memory_budget_gib.
    plan = plan_memory(cfg, MEMORY, len(model.layers), device, cfg.enable_activation_checkpointing,
                       cfg.get("enable_activation_offloading", False), cfg.get("memory_budget_gib"),
                       world_size=world_size)
    set_memory_policy(model, plan.layers, plan.mlp_chunk_tokens, plan.by_block)
    if cfg.compile:
        compile_layers(model)
    params = list(model.parameters())
    optimizer = ShardedStateOptimizer(model, instantiate(cfg.optimizer, params))
    scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss)
    if cfg.compile:
        loss_fn.compile()

    # Checkpoints: every rank gathers (collectives) and writes its optimizer shards; rank 0 alone is
    # handed the folder, and writes the model.
    fingerprint = run_fingerprint(cfg.model._component_, len(dataset), cfg.batch_size, accumulation,
                                  cfg.shuffle, cfg.seed, world_size)
    # What a resumed run may change (each change is applied and said); the fingerprint's it may not.
    settings = {"optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "epochs": cfg.epochs,
                "max_steps_per_epoch": cfg.get("max_steps_per_epoch"), "clip_grad_norm": cfg.get("clip_grad_norm"),
                "log_every_n_steps": cfg.log_every_n_steps, "eval_every_n_steps": cfg.get("eval_every_n_steps"),
                "save_every_n_steps": cfg.get("save_every_n_steps")}

    def write_model(folder: Path | None) -> None:
        weights = gather_full_state_dict(model)  # whole tensors in host memory, on rank 0 only
        if folder is not None:
            checkpointer.save(weights, folder / "model", dtype)
        optimizer.save_shards(folder)

    def save() -> Path:
        return save_checkpoint(output_dir, progress, write_model, optimizer, scheduler, fingerprint, settings,
                               cfg.get("keep_last_n_checkpoints"), run.run_id)

    progress, saved_step = Progress(), None
    if run.resume is not None:
        optimizer.load_shards(run.resume)  # each rank reads its shards; the weights came back above
        progress = load_training_state(run.resume, optimizer, scheduler, fingerprint, settings, epoch_steps)
        saved_step = progress.step
        print(f"resumed from {run.resume}: step {progress.step} of {total_steps}")

    reporter = StepReporter(logger, total_steps, progress.step, device, cfg.log_every_n_steps,
                            cfg.get("log_peak_memory_stats", False))
    profiler = instantiate(cfg.profiler) if cfg.get("profiler") else build_profiler()
    skip_limit = cfg.get("skip_nonfinite_steps") or 0
    divergence_factor = cfg.get("divergence_factor", 10.0)
    model.train()
    reset_peak_memory(device)
    with reporter, profiler, StopRequest() as stop, advice_on_oom(
            cfg.batch_size, accumulation, cfg.enable_activation_checkpointing):
        for epoch in range(progress.epoch, cfg.epochs):
            batches = epoch_batches(loader, epoch, skip_batches=progress.step_in_epoch * accumulation)
            while progress.epoch == epoch:
                if stop.requested():  # agreed by every rank: stop between steps, with a checkpoint
                    if saved_step != progress.step:
                        save()
                    raise stop.stopped(progress.step, total_steps, output_dir / f"step_{progress.step}")
                started = time.perf_counter()

                # One optimizer step over `accumulation` micro-batches of every rank. The labelled tokens
                # are counted over all ranks, so each rank's loss is its share of the global batch's.
                window = [next(batches) for _ in range(accumulation)]
                num_labels = labelled_tokens(window)
                step_loss = torch.zeros((), device=device)
                for i, batch in enumerate(window):
                    # Gradients are reduced across ranks once a step, after the last micro-batch.
                    set_gradient_sync(model, i == len(window) - 1)
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    hidden = model.hidden_states(batch["tokens"], batch.get("positions"),
                                                 document_ids=batch.get("document_ids"))
                    share = (batch["labels"] != IGNORE_INDEX).sum() / num_labels
                    loss = loss_fn(hidden, batch["labels"], model.output) * share
                    loss.backward()
                    step_loss += loss.detach()
                step_loss = sum_over_ranks(step_loss)  # the global batch's: every rank decides alike below
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

                # A NaN or infinite loss or gradient never reaches the weights: skip the step, or stop; nor does a
                # loss far above its recent history (divergence_factor): stop.
                if is_finite(step_loss, grad_norm) and not diverged(progress, step_loss, divergence_factor):
                    if cfg.get("clip_grad_norm"):
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad_norm, grad_norm)
                    optimizer.step()
                else:
                    samples = step_sample_indices(loader, epoch, progress.step_in_epoch, accumulation)
                    progress, message = skip_or_stop(progress, skip_limit, divergence_factor, step_loss, grad_norm,
                                                     samples, output_dir)
                    reporter.note(message)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress = progress.advanced(epoch_steps, step_loss)

                reporter.report(progress.step, epoch, step_loss, optimizer.param_groups[0]["lr"], num_labels, started,
                                grad_norm, progress.skipped_steps)
                profiler.step()
                eval_every = cfg.get("eval_every_n_steps")
                if val_loader is not None and (progress.step == total_steps
                                               or (eval_every and progress.step % eval_every == 0)):
                    reporter.log({"val_loss": validation_loss(model, loss_fn, val_loader).item()}, progress.step)
                save_every = cfg.get("save_every_n_steps")
                if progress.step_in_epoch == 0 or (save_every and progress.step % save_every == 0):
                    save()
                    saved_step = progress.step
    final = output_dir / f"step_{progress.step}"
    if checkpoint_lacks(final, ["model"]):
        save()  # resumed at the last step from a checkpoint in another folder
    if rank == 0:
        print(f"done on {world_size} processes: {final / 'model'} (HF layout)")


if __name__ == "__main__":
    recipe_entry(main)
