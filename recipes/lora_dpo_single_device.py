"""Preference tuning (DPO, IPO, SimPO) of a Llama model with LoRA or QLoRA, on one device.

    tunelite run lora_dpo_single_device --config llama3_1/8B_lora_dpo_single_device
    tunelite run lora_dpo_single_device --config tiny/lora_dpo_cpu

What makes this preference tuning: each sample is a prompt with a chosen and a rejected response.
Both run in one forward (the batch's chosen sequences, then its rejected ones); the loss compares
how much more likely the policy makes the chosen response than the reference does, against the
same for the rejected one. The reference is the same model with its adapters switched off, so
no second copy of the weights is kept: it is the model as it was before this run's adapters.
Logged with the loss: the implicit rewards of chosen and rejected responses, how often the
chosen one's is higher (reward accuracy) and by how much (margin).

The training loop is written out in `main` below; to change it, copy this file
(`tunelite cp lora_dpo_single_device my_recipe.py`), edit the copy, and run it with
`tunelite run my_recipe.py --config my.yaml`. A key the copy reads goes into its CONFIG_KEYS.
"""

import time
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.loading import load_checkpoint_into
from tunelite.checkpointing.output_dir import RunFolder, claim_output_dir
from tunelite.checkpointing.peft import base_model_name, load_adapter_into, save_peft_adapter
from tunelite.checkpointing.state import (
    Progress,
    checkpoint_lacks,
    load_training_state,
    run_fingerprint,
    save_checkpoint,
)
from tunelite.config import instantiate, recipe_entry
from tunelite.data.loader import build_dataloader, epoch_batches, labelled_tokens, step_sample_indices, steps_per_epoch
from tunelite.data.preference import preference_collate
from tunelite.modules.lora import adapters_disabled, merged_state_dict, set_trainable_params
from tunelite.modules.loss import IGNORE_INDEX, sequence_log_probs
from tunelite.modules.memory_policy import set_memory_policy
from tunelite.modules.preference import PreferenceOutput
from tunelite.runtime.device import get_device, get_dtype, reset_peak_memory
from tunelite.runtime.seed import set_seed
from tunelite.training.compile import compile_layers
from tunelite.training.memory_policy import plan_memory
from tunelite.training.nonfinite import bad_step, skip_or_stop, skipped_if_bad
from tunelite.training.oom import advice_on_oom
from tunelite.training.profiling import build_profiler
from tunelite.training.reporting import StepReporter, build_metric_loggers
from tunelite.training.signals import StopRequest

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
        "eval_every_n_steps", "save_every_n_steps", "keep_last_n_checkpoints", "save_merged_model",
        "resume_from_checkpoint", "log_peak_memory_stats", "base_model_id", "log_prob_chunks",
        "overwrite_output_dir", "divergence_factor",
        "enable_activation_offloading", "memory_budget_gib",
    ),
}
# What `tunelite estimate` needs to know of this recipe: only the adapters train, and a sample is two
# sequences (chosen and rejected) in one forward.
MEMORY = {"trains": "adapters", "sequences_per_sample": 2}
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def main(cfg: DictConfig) -> None:
    # The output folder is this run's alone while it runs (README: "Where outputs go").
    with claim_output_dir(Path(cfg.output_dir), cfg.get("resume_from_checkpoint", False),
                          cfg.get("overwrite_output_dir", False)) as run:
        train(cfg, run)


def train(cfg: DictConfig, run: RunFolder) -> None:
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    logger = build_metric_loggers(cfg.metric_logger)
    logger.log_config(cfg)

    # Data: preference pairs, each batch its chosen sequences then its rejected ones.
    tokenizer = instantiate(cfg.tokenizer)
    dataset = instantiate(cfg.dataset, tokenizer)
    collate = partial(preference_collate, pad_id=tokenizer.pad_id)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.shuffle, cfg.seed, collate)
    val_loader = None
    if cfg.get("val_dataset") or cfg.dataset.get("val_fraction"):
        val_set = (instantiate(cfg.val_dataset, tokenizer) if cfg.get("val_dataset")
                   else instantiate(cfg.dataset, tokenizer, partition="validation"))
        val_loader = build_dataloader(val_set, cfg.batch_size, False, cfg.seed, collate, drop_last=False)
    accumulation = cfg.gradient_accumulation_steps
    epoch_steps = steps_per_epoch(loader, accumulation, cfg.get("max_steps_per_epoch"))
    total_steps = epoch_steps * cfg.epochs

    # The model, built on the meta device and filled from the checkpoint; only lora_a / lora_b learn.
    checkpointer = instantiate(cfg.checkpointer)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    load_checkpoint_into(model, checkpointer, device, dtype)
    set_trainable_params(model)
    # What each layer keeps for backward: the switches' policy, or the fastest that fits memory_budget_gib.
    plan = plan_memory(cfg, MEMORY, len(model.layers), device, cfg.enable_activation_checkpointing,
                       cfg.get("enable_activation_offloading", False), cfg.get("memory_budget_gib"))
    set_memory_policy(model, plan.layers, plan.mlp_chunk_tokens, plan.by_block)
    if cfg.compile:
        compile_layers(model)
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer, adapters)
    scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)
    loss_fn = instantiate(cfg.loss)  # DPOLoss, IPOLoss or SimPOLoss (tunelite.modules.preference)
    chunks = cfg.get("log_prob_chunks", 8)

    def preference(batch: dict[str, torch.Tensor]) -> PreferenceOutput:
        """The loss and rewards of a batch's pairs: rows :n of `tokens` are the chosen sequences, n: the rejected."""
        tokens, labels = batch["tokens"], batch["labels"]
        pairs = tokens.shape[0] // 2
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        reference = (None, None)
        if loss_fn.needs_reference:
            # The model before this run's adapters, with nothing kept for backward.
            with torch.no_grad(), adapters_disabled(model):
                ref = sequence_log_probs(model.hidden_states(tokens), labels, model.output, chunks)
            reference = (ref[:pairs], ref[pairs:])
        policy = sequence_log_probs(model.hidden_states(tokens), labels, model.output, chunks)
        return loss_fn(policy[:pairs], policy[pairs:], *reference, counts[:pairs], counts[pairs:])

    def reward_sums(out: PreferenceOutput) -> torch.Tensor:
        """Sums over the pairs of the four reward metrics (REWARD_METRICS' order)."""
        chosen, rejected = out.chosen_rewards, out.rejected_rewards
        return torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum()])

    # Checkpoints: the adapter (peft layout), at the end also merged into the base; resumed from
    # the newest one when the config asks, with optimizer, schedule, RNG and data position.
    fingerprint = run_fingerprint(cfg.model._component_, len(dataset), cfg.batch_size, accumulation,
                                  cfg.shuffle, cfg.seed)
    # What a resumed run may change (each change is applied and said); the fingerprint's it may not.
    settings = {"optimizer": cfg.optimizer, "lr_scheduler": cfg.lr_scheduler, "epochs": cfg.epochs,
                "max_steps_per_epoch": cfg.get("max_steps_per_epoch"), "clip_grad_norm": cfg.get("clip_grad_norm"),
                "log_every_n_steps": cfg.log_every_n_steps, "eval_every_n_steps": cfg.get("eval_every_n_steps"),
                "save_every_n_steps": cfg.get("save_every_n_steps")}

    def write_adapter(folder: Path) -> None:
        base = base_model_name(checkpointer.checkpoint_dir, cfg.get("base_model_id"))  # the hub id where known
        save_peft_adapter(model, folder / "adapter", base)
        if cfg.get("save_merged_model", False) and progress.step == total_steps:
            checkpointer.save(merged_state_dict(model), folder / "model")

    def save() -> Path:
        return save_checkpoint(output_dir, progress, write_adapter, optimizer, scheduler, fingerprint, settings,
                               cfg.get("keep_last_n_checkpoints"), run.run_id)

    progress, saved_step = Progress(), None
    if run.resume is not None:
        load_adapter_into(model, run.resume / "adapter")
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

                # One optimizer step over `accumulation` micro-batches; the loss is the mean over the
                # step's pairs, so each micro-batch's summed losses are divided by all of them.
                window = [next(batches) for _ in range(accumulation)]
                num_pairs = sum(batch["tokens"].shape[0] // 2 for batch in window)
                step_loss = torch.zeros((), device=device)
                rewards = torch.zeros(len(REWARD_METRICS), device=device)
                for batch in window:
                    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
                    out = preference(batch)
                    loss = out.losses.sum() / num_pairs
                    loss.backward()
                    step_loss += loss.detach()
                    rewards += reward_sums(out)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in adapters if p.grad is not None])

                # A NaN or infinite loss or gradient never reaches the weights: skip the step, or stop; nor does a
                # loss far above its recent history (divergence_factor): stop. Decided on the device, so the
                # update is queued while the GPU finishes the backward; the verdict is read after.
                bad = bad_step(step_loss, grad_norm, progress, divergence_factor)
                if cfg.get("clip_grad_norm"):
                    torch.nn.utils.clip_grads_with_norm_(adapters, cfg.clip_grad_norm, grad_norm)
                with skipped_if_bad(optimizer, bad) as take_step:
                    if take_step:
                        optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if bad.item():
                    samples = step_sample_indices(loader, epoch, progress.step_in_epoch, accumulation)
                    progress, message = skip_or_stop(progress, skip_limit, divergence_factor, step_loss, grad_norm,
                                                     samples, output_dir)
                    reporter.note(message)
                scheduler.step()
                progress = progress.advanced(epoch_steps, step_loss)

                reporter.report(progress.step, epoch, step_loss, optimizer.param_groups[0]["lr"],
                                labelled_tokens(window), started, grad_norm, progress.skipped_steps,
                                dict(zip(REWARD_METRICS, (rewards / num_pairs).tolist())))
                profiler.step()
                eval_every = cfg.get("eval_every_n_steps")
                if val_loader is not None and (progress.step == total_steps
                                               or (eval_every and progress.step % eval_every == 0)):
                    # The same loss and rewards on held-out pairs, with dropout off.
                    model.eval()
                    val_loss, val_rewards, val_pairs = torch.zeros((), device=device), torch.zeros(4, device=device), 0
                    with torch.no_grad():
                        for batch in val_loader:
                            out = preference({key: value.to(device) for key, value in batch.items()})
                            val_loss, val_rewards = val_loss + out.losses.sum(), val_rewards + reward_sums(out)
                            val_pairs += out.losses.shape[0]
                    model.train()
                    val_metrics = dict(zip(REWARD_METRICS, (val_rewards / val_pairs).tolist()))
                    reporter.log({"val_loss": (val_loss / val_pairs).item(),
                                  **{f"val_{name}": value for name, value in val_metrics.items()}}, progress.step)
                save_every = cfg.get("save_every_n_steps")
                if progress.step_in_epoch == 0 or (save_every and progress.step % save_every == 0):
                    save()
                    saved_step = progress.step

    final = output_dir / f"step_{progress.step}"
    if checkpoint_lacks(final, ["adapter", "model"] if cfg.get("save_merged_model", False) else ["adapter"]):
        save()  # resumed at the last step from another folder, or from a checkpoint without the merged model
    merged = f", {final / 'model'} (merged, HF layout)" if (final / "model").is_dir() else ""
    print(f"done: {final / 'adapter'} (peft layout){merged}")


if __name__ == "__main__":
    recipe_entry(main)
