"""LoRA fine-tuning of a Llama model on one device (a GPU, or the CPU for the tiny demo).

    tunelite run lora_finetune_single_device --config llama3_1/8B_lora_single_device

What makes this LoRA: the base weights are frozen (`set_trainable_params`), only the adapters
reach the optimizer, and the run ends with the adapter in peft's layout plus, if asked, the
adapter merged into a full Hugging Face checkpoint. Everything else is library code shared
with the other recipes; the loop below is the whole of training.
"""

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.peft import load_adapter_into, save_peft_adapter
from tunelite.checkpointing.state import Progress, find_resume_folder, load_training_state, save_checkpoint
from tunelite.config import instantiate, recipe_entry
from tunelite.models.llama import set_activation_checkpointing
from tunelite.modules.lora import merged_state_dict, set_trainable_params
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.training.device import get_device, get_dtype, peak_memory_gib
from tunelite.training.loop import (
    build_dataloader,
    build_metric_logger,
    compile_layers,
    epoch_batches,
    format_metrics,
    next_window,
    steps_per_epoch,
)
from tunelite.training.model_loading import load_pretrained_model
from tunelite.training.progress import progress_bar
from tunelite.training.seed import set_seed


def main(cfg: DictConfig) -> None:
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    logger = build_metric_logger(cfg.metric_logger)
    logger.log_config(cfg)

    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.shuffle, tokenizer.pad_id, cfg.seed)

    checkpointer = instantiate(cfg.checkpointer)
    model = load_pretrained_model(cfg.model, checkpointer, device, dtype)
    set_trainable_params(model)
    set_activation_checkpointing(model, 1 if cfg.enable_activation_checkpointing else 0)
    if cfg.compile:
        compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]

    accum = cfg.gradient_accumulation_steps
    steps = steps_per_epoch(loader, accum, cfg.max_steps_per_epoch)
    total_steps = steps * cfg.epochs
    optimizer = instantiate(cfg.optimizer, params)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss)

    # What decides which batches come next: a resumed run must agree on all of it.
    fingerprint = {"model": cfg.model._component_, "dataset_size": len(dataset), "batch_size": cfg.batch_size,
                   "gradient_accumulation_steps": accum, "steps_per_epoch": steps, "shuffle": cfg.shuffle,
                   "seed": cfg.seed}
    progress = Progress()
    resume = find_resume_folder(cfg.resume_from_checkpoint, output_dir)
    if resume is not None:
        load_adapter_into(model, resume / "adapter")
        progress = load_training_state(resume, optimizer, scheduler, fingerprint)
        print(f"resumed from {resume}: step {progress.step} of {total_steps}")

    def write_weights(folder: Path) -> None:
        save_peft_adapter(model, folder / "adapter", base_model_name_or_path=str(checkpointer.checkpoint_dir))
        if cfg.save_merged_model and progress.step == total_steps:
            checkpointer.save(merged_state_dict(model), folder / "model")

    bar = progress_bar(total_steps, initial=progress.step)
    model.train()
    for epoch in range(progress.epoch, cfg.epochs):
        batches = epoch_batches(loader, epoch, skip_batches=progress.step_in_epoch * accum)
        while progress.epoch == epoch:
            start = time.perf_counter()
            window, num_labels = next_window(batches, accum)
            step_loss = torch.zeros((), device=device)
            for batch in window:
                tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
                loss = loss_fn(model.hidden_states(tokens), labels, model.output)
                # Weight each micro-batch by its share of the step's labelled tokens.
                share = (labels != IGNORE_INDEX).sum() / num_labels
                (loss * share).backward()
                step_loss += loss.detach() * share
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm) if cfg.clip_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress = progress.advanced(steps)

            metrics = {
                "loss": step_loss.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "tokens_per_s": num_labels / (time.perf_counter() - start),
            }
            bar.update(1)
            bar.set_postfix(format_metrics(metrics))
            if progress.step % cfg.log_every_n_steps == 0 or progress.step == total_steps:
                if grad_norm is not None:
                    metrics["grad_norm"] = grad_norm.item()
                if cfg.log_peak_memory_stats:
                    metrics.update(peak_memory_gib(device))
                logger.log_dict({"epoch": epoch, **metrics}, progress.step)
            if (cfg.save_every_n_steps and progress.step % cfg.save_every_n_steps == 0) or progress.step_in_epoch == 0:
                save_checkpoint(output_dir, progress, write_weights, optimizer, scheduler, fingerprint,
                                cfg.keep_last_n_checkpoints)
    bar.close()
    logger.close()
    print(f"saved {output_dir / f'step_{progress.step}'}: adapter/ in peft layout" + (", model/ merged in HF layout" if cfg.save_merged_model else ""))


if __name__ == "__main__":
    recipe_entry(main)
