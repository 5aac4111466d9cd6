"""Full fine-tuning of a Llama model on one device: every weight trains.

    tunelite run full_finetune_single_device --config llama3_1/8B_full_single_device

What makes this full, and what makes 8B fit a 24 GB card: every parameter reaches the
optimizer, so memory goes to weights, gradients and optimizer state. The 8B config uses
`tunelite.training.offload_optimizer.overlapped_cpu_adamw`: fp32 master weights, AdamW state and
the accumulated gradients live in host memory, each gradient leaves the GPU as backward produces
it, and the CPU's update overlaps the next forward (it gives the gradient norm and clips inside
its update, since the gradients are never on the GPU together). With `optimizer_in_bwd` each
parameter is instead stepped the moment its gradient is ready and the gradient freed, so the
15 GiB of bf16 gradients never exist at once; the optimizer state can also be 8- or 4-bit
(torchao AdamW8bit/AdamW4bit). Checkpoints hold the whole model in the base checkpoint's Hugging
Face layout.

The training loop is written out in `main` below, top to bottom; to change it, copy this file
(`tunelite cp full_finetune_single_device my_recipe.py`), edit the copy, and run it with
`tunelite run my_recipe.py --config my.yaml`. A key the copy reads goes into its CONFIG_KEYS.
"""

import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.loading import load_checkpoint_into, restore_weights
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
from tunelite.errors import ConfigError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.modules.memory_policy import set_memory_policy
from tunelite.runtime.device import get_device, get_dtype, reset_peak_memory
from tunelite.runtime.seed import set_seed
from tunelite.training.compile import compile_layers
from tunelite.training.divergence import diverged
from tunelite.training.memory_policy import plan_memory
from tunelite.training.nonfinite import is_finite, skip_or_stop
from tunelite.training.offload_optimizer import OverlappedCPUAdamW
from tunelite.training.oom import advice_on_oom
from tunelite.training.optimizers import OptimizerInBackward, backward_stepping_weights
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
        "log_peak_memory_stats", "optimizer_in_bwd", "overwrite_output_dir", "divergence_factor",
        "enable_activation_offloading", "memory_budget_gib",
    ),
}
# What `tunelite estimate` needs to know of this recipe: every weight trains, one sequence a sample.
MEMORY = {"trains": "all", "sequences_per_sample": 1}


def main(cfg: DictConfig) -> None:
    # The output folder is this run's alone while it runs (README: "Where outputs go").
    with claim_output_dir(Path(cfg.output_dir), cfg.get("resume_from_checkpoint", False),
                          cfg.get("overwrite_output_dir", False)) as run:
        train(cfg, run)


def train(cfg: DictConfig, run: RunFolder) -> None:
    in_backward = cfg.get("optimizer_in_bwd", False)
    accumulation = cfg.gradient_accumulation_steps
    if in_backward and (cfg.get("clip_grad_norm") or accumulation > 1):
        raise ConfigError("optimizer_in_bwd: True steps each weight during backward, so it can neither clip the "
                          "total gradient norm nor accumulate gradients; set clip_grad_norm: null and "
                          "gradient_accumulation_steps: 1, or optimizer_in_bwd: False")
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    logger = build_metric_loggers(cfg.metric_logger)
    logger.log_config(cfg)

    # Data: token ids and labels, batched in an order a resumed run can reproduce.
    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer)
    collate = partial(padded_collate, pad_id=tokenizer.pad_id)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.shuffle, cfg.seed, collate)
    val_loader = None
    if cfg.get("val_dataset") or cfg.dataset.get("val_fraction"):
        # A dataset of its own, or the held-out share of the training source.
        val_set = (instantiate(cfg.val_dataset, tokenizer) if cfg.get("val_dataset")
                   else instantiate(cfg.dataset, tokenizer, partition="validation"))
        val_loader = build_dataloader(val_set, cfg.batch_size, False, cfg.seed, collate, drop_last=False)
    epoch_steps = steps_per_epoch(loader, accumulation, cfg.get("max_steps_per_epoch"))
    total_steps = epoch_steps * cfg.epochs

    # The model, built on the meta device and filled from the checkpoint; every weight learns.
    checkpointer = instantiate(cfg.checkpointer)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    load_checkpoint_into(model, checkpointer, device, dtype)
    # What each layer keeps for backward: the switches' policy, or the fastest that fits memory_budget_gib.
    plan = plan_memory(cfg, MEMORY, len(model.layers), device, cfg.enable_activation_checkpointing,
                       cfg.get("enable_activation_offloading", False), cfg.get("memory_budget_gib"))
    set_memory_policy(model, plan.layers, plan.mlp_chunk_tokens, plan.by_block)
    if cfg.compile:
        compile_layers(model)
    params = list(model.parameters())
    if in_backward:
        # One optimizer per weight, stepped from its gradient hook; optimizer.step() below is a no-op.
        optimizer = OptimizerInBackward(params, lambda one: instantiate(cfg.optimizer, one))
    else:
        optimizer = instantiate(cfg.optimizer, params)
    host_gradients = isinstance(optimizer, OverlappedCPUAdamW)
    if host_gradients:
        optimizer.wait_in_forward(model)  # its update overlaps the next forward, each layer waiting for its weights
    scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss)
    if cfg.compile:
        loss_fn.compile()

    # Checkpoints: the whole model in the base's HF layout, in the training dtype so that a resumed
    # run continues from exactly these weights; with optimizer, schedule, RNG and data position.
    fingerprint = run_fingerprint(cfg.model._component_, len(dataset), cfg.batch_size, accumulation,
                                  cfg.shuffle, cfg.seed)
    # What a resumed run may change (each change is applied and said); the fingerprint's it may not.
    settings = {"optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "epochs": cfg.epochs,
                "max_steps_per_epoch": cfg.get("max_steps_per_epoch"), "clip_grad_norm": cfg.get("clip_grad_norm"),
                "log_every_n_steps": cfg.log_every_n_steps, "eval_every_n_steps": cfg.get("eval_every_n_steps"),
                "save_every_n_steps": cfg.get("save_every_n_steps")}

    def save() -> Path:
        return save_checkpoint(output_dir, progress, lambda folder: checkpointer.save(model.state_dict(),
                               folder / "model", dtype), optimizer, scheduler, fingerprint, settings,
                               cfg.get("keep_last_n_checkpoints"), run.run_id)

    progress, saved_step = Progress(), None
    if run.resume is not None:
        restore_weights(model, run.resume / "model")
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
                if stop.requested():  # SIGTERM / Ctrl-C: stop between steps, with a checkpoint
                    if saved_step != progress.step:
                        save()
                    raise stop.stopped(progress.step, total_steps, output_dir / f"step_{progress.step}")
                started = time.perf_counter()

                # One optimizer step over `accumulation` micro-batches. Each micro-batch's mean loss is
                # weighted by its share of the step's labelled tokens, so every token counts the same.
                window = [next(batches) for _ in range(accumulation)]
                num_labels = labelled_tokens(window)
                step_loss = torch.zeros((), device=device)
                for batch in window:
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    hidden = model.hidden_states(batch["tokens"], batch.get("positions"),
                                                 document_ids=batch.get("document_ids"))
                    share = (batch["labels"] != IGNORE_INDEX).sum() / num_labels
                    loss = loss_fn(hidden, batch["labels"], model.output) * share
                    step_loss += loss.detach()
                    if not in_backward:
                        loss.backward()
                if host_gradients:
                    grad_norm = optimizer.total_grad_norm()  # once the last gradients have reached host memory
                elif not in_backward:
                    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                elif is_finite(step_loss) and not diverged(progress, step_loss, divergence_factor):
                    # Each weight steps in its gradient hook during this backward: the loss, checked just
                    # above, is all that can be checked before a weight changes.
                    grad_norm = backward_stepping_weights(loss, params, progress.step + 1, output_dir)
                else:
                    grad_norm = None  # no backward: no weight took this step

                # A NaN or infinite loss or gradient never reaches the weights: skip the step, or stop; nor does a
                # loss far above its recent history (divergence_factor): stop.
                if is_finite(step_loss, grad_norm) and not diverged(progress, step_loss, divergence_factor):
                    if cfg.get("clip_grad_norm") and host_gradients:
                        optimizer.clip_grads_with_norm_(cfg.clip_grad_norm, grad_norm)  # a scale inside its update
                    elif cfg.get("clip_grad_norm"):
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
    print(f"done: {final / 'model'} holds the model in HF layout")


if __name__ == "__main__":
    recipe_entry(main)
