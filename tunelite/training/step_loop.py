"""The bookkeeping around a recipe's training step: epochs, the position in the data, resume,
timing, the progress bar, metrics, the profiler and checkpoints.

The recipe keeps the step itself (forward, backward, optimizer) and what its checkpoints hold;
this is the part every recipe would otherwise copy, and torchtune's copies drifted apart.
"""

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.state import Progress, find_resume_folder, load_training_state, save_checkpoint
from tunelite.config import instantiate
from tunelite.training.device import oom_advice, reset_peak_memory
from tunelite.training.loop import StepReporter, epoch_batches, next_window, validation_loss
from tunelite.training.profiling import build_profiler
from tunelite.training.run_setup import RunSetup


class StepLoop:
    """Used as `with StepLoop(...) as loop: for window, n in loop.windows(): ...; loop.step_done(...)`;
    leaving the block closes the loggers and turns a CUDA out-of-memory error into advice."""

    def __init__(
        self, cfg: DictConfig, run: RunSetup, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: Any,
        write_weights: Callable[[Path], None], restore_weights: Callable[[Path], None], world_size: int = 1,
    ) -> None:
        """Builds the LR schedule, then resumes when the config asks: `restore_weights(folder)` reloads
        what `write_weights` wrote, and optimizer, schedule, RNG and data position follow."""
        scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=run.total_steps)
        self.cfg, self.run, self.optimizer, self.scheduler = cfg, run, optimizer, scheduler
        self.model, self.loss_fn = model, loss_fn
        self.write_weights = write_weights
        self.fingerprint = run.fingerprint(cfg, world_size)
        self.progress = Progress()
        resume = find_resume_folder(cfg.resume_from_checkpoint, run.output_dir)
        if resume is not None:
            restore_weights(resume)
            self.progress = load_training_state(resume, optimizer, scheduler, self.fingerprint)
            print(f"resumed from {resume}: step {self.progress.step} of {run.total_steps}")
        self.reporter = StepReporter(run.logger, run.total_steps, self.progress.step, run.device,
                                     cfg.log_every_n_steps, cfg.log_peak_memory_stats)
        self.profiler = instantiate(cfg.profiler) if "profiler" in cfg else build_profiler()
        self._start = 0.0
        self._num_labels = 0

    @property
    def is_last_step(self) -> bool:
        return self.progress.step == self.run.total_steps

    def __enter__(self) -> "StepLoop":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.profiler.__exit__(None, None, None)
        self.reporter.close()
        if isinstance(exc, torch.OutOfMemoryError):
            cfg = self.cfg
            raise oom_advice(exc, cfg.batch_size, cfg.gradient_accumulation_steps,
                             cfg.enable_activation_checkpointing) from None

    @property
    def last_checkpoint(self) -> Path:
        return self.run.output_dir / f"step_{self.progress.step}"

    def windows(self) -> Iterator[tuple[list[dict[str, torch.Tensor]], int]]:
        """Each optimizer step's micro-batches and their labelled-token count, from where the run stands."""
        accum = self.cfg.gradient_accumulation_steps
        self.model.train()
        reset_peak_memory(self.run.device)
        self.profiler.__enter__()
        for epoch in range(self.progress.epoch, self.cfg.epochs):
            batches = epoch_batches(self.run.loader, epoch, skip_batches=self.progress.step_in_epoch * accum)
            while self.progress.epoch == epoch:
                self._start = time.perf_counter()
                window, self._num_labels = next_window(batches, accum)
                yield window, self._num_labels

    def step_done(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Advances the LR schedule and records the step that just ran; reports the validation loss
        every eval_every_n_steps and at the end; saves a checkpoint at epoch ends and every
        save_every_n_steps."""
        self.scheduler.step()
        epoch = self.progress.epoch
        self.progress = self.progress.advanced(self.run.steps_per_epoch)
        self.reporter.report(self.progress.step, epoch, loss, self.optimizer.param_groups[0]["lr"], self._num_labels,
                             time.perf_counter() - self._start, grad_norm)
        self.profiler.step()
        eval_every = self.cfg.get("eval_every_n_steps")
        if self.run.val_loader is not None and (self.is_last_step or (eval_every and self.progress.step % eval_every == 0)):
            val_loss = validation_loss(self.model, self.loss_fn, self.run.val_loader).item()
            self.reporter.logger.log_dict({"val_loss": val_loss}, self.progress.step)
        every = self.cfg.save_every_n_steps
        if self.progress.step_in_epoch == 0 or (every and self.progress.step % every == 0):
            save_checkpoint(self.run.output_dir, self.progress, self.write_weights, self.optimizer, self.scheduler,
                            self.fingerprint, self.cfg.keep_last_n_checkpoints)
