"""The bookkeeping around a recipe's training step: epochs, the position in the data, resume,
timing, the progress bar, metrics, the profiler and checkpoints.

The recipe keeps the step itself (forward, backward, optimizer) and what its checkpoints hold;
this is the part every recipe would otherwise copy, and torchtune's copies drifted apart.
"""

import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig

from tunelite.checkpointing.state import (
    Progress,
    find_resume_folder,
    load_training_state,
    newest_checkpoint_note,
    save_checkpoint,
)
from tunelite.config import instantiate
from tunelite.distributed.process import max_over_ranks
from tunelite.errors import NonFiniteError
from tunelite.training.device import oom_advice, reset_peak_memory
from tunelite.training.loop import (
    StepReporter,
    StopRequest,
    epoch_batches,
    next_window,
    resume_command,
    validation_loss,
    window_indices,
)
from tunelite.training.profiling import build_profiler
from tunelite.training.run_setup import RunSetup


class StepLoop:
    """Used as `with StepLoop(...) as loop: for window, n in loop.windows(): ...; loop.step_done(...)`;
    leaving the block closes the loggers and turns a CUDA out-of-memory error into advice.

    Inside the block SIGTERM and SIGINT stop the run after the step in progress, with a checkpoint
    and the command that resumes it (see StopRequest), and a step with a non-finite loss or
    gradient norm is skipped, up to skip_nonfinite_steps of them, or stops the run without a
    checkpoint of it."""

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
        self._saved_step: int | None = None  # the step the newest checkpoint of this run holds
        resume = find_resume_folder(cfg.resume_from_checkpoint, run.output_dir)
        if resume is not None:
            restore_weights(resume)
            self.progress = load_training_state(resume, optimizer, scheduler, self.fingerprint)
            self._saved_step = self.progress.step
            print(f"resumed from {resume}: step {self.progress.step} of {run.total_steps}")
        self.reporter = StepReporter(run.logger, run.total_steps, self.progress.step, run.device,
                                     cfg.log_every_n_steps, cfg.log_peak_memory_stats)
        self.profiler = instantiate(cfg.profiler) if "profiler" in cfg else build_profiler()
        self._start = 0.0
        self._num_labels = 0
        self.stop = StopRequest()

    @property
    def is_last_step(self) -> bool:
        return self.progress.step == self.run.total_steps

    def __enter__(self) -> "StepLoop":
        self.stop.__enter__()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.stop.__exit__()
        self.profiler.__exit__(None, None, None)
        self.reporter.close()
        if isinstance(exc, NonFiniteError):
            raise NonFiniteError(f"{self._step_name()}: {exc}. No checkpoint was written of this state. "
                                 f"{newest_checkpoint_note(self.run.output_dir)}") from None
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
                # Agreed by every rank: a rank that stopped alone would leave the others waiting in a collective.
                signum = max_over_ranks(self.stop.signum or 0)
                if signum:
                    self.stop.signum = signum
                    self._stop_for_signal()
                self._start = time.perf_counter()
                window, self._num_labels = next_window(batches, accum)
                yield window, self._num_labels

    def step_done(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Advances the LR schedule and records the step that just ran; reports the validation loss
        every eval_every_n_steps and at the end; saves a checkpoint at epoch ends and every
        save_every_n_steps."""
        if not all(value is None or torch.isfinite(value) for value in (loss, grad_norm)):
            self._skip_nonfinite(loss, grad_norm)
        self.scheduler.step()
        epoch = self.progress.epoch
        self.progress = self.progress.advanced(self.run.steps_per_epoch)
        self.reporter.report(self.progress.step, epoch, loss, float(self.optimizer.param_groups[0]["lr"]), self._num_labels,
                             self._start, grad_norm, self.progress.skipped_steps)
        self.profiler.step()
        eval_every = self.cfg.get("eval_every_n_steps")
        if self.run.val_loader is not None and (self.is_last_step or (eval_every and self.progress.step % eval_every == 0)):
            val_loss = validation_loss(self.model, self.loss_fn, self.run.val_loader).item()
            self.reporter.logger.log_dict({"val_loss": val_loss}, self.progress.step)
        every = self.cfg.save_every_n_steps
        if self.progress.step_in_epoch == 0 or (every and self.progress.step % every == 0):
            self._save()

    def _save(self) -> None:
        save_checkpoint(self.run.output_dir, self.progress, self.write_weights, self.optimizer, self.scheduler,
                        self.fingerprint, self.cfg.keep_last_n_checkpoints)
        self._saved_step = self.progress.step

    def _step_name(self) -> str:
        """The step in progress as reports name it: its number and the dataset samples it holds."""
        indices = window_indices(self.run.loader, self.progress.epoch, self.progress.step_in_epoch,
                                 self.cfg.gradient_accumulation_steps)
        return f"step {self.progress.step + 1} (dataset samples {', '.join(map(str, indices))})"

    def _skip_nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Counts a step that optimizer_step left undone for a non-finite value as skipped, up to
        skip_nonfinite_steps of them; its data and LR schedule move on as for any step. One more
        stops the run, with the step named in __exit__."""
        values = f"the loss is {loss.item()}" + ("" if grad_norm is None else f", the gradient norm {grad_norm.item()}")
        limit = self.cfg.get("skip_nonfinite_steps") or 0
        if self.progress.skipped_steps >= limit:
            raise NonFiniteError(
                f"{values}; the optimizer did not step, so the weights are those after step {self.progress.step}. "
                f"Look at those samples, lower the learning rate, or skip such steps with skip_nonfinite_steps: N "
                f"(now {limit}, {self.progress.skipped_steps} skipped)"
            )
        self.progress = replace(self.progress, skipped_steps=self.progress.skipped_steps + 1)
        self.reporter.note(f"{self._step_name()}: {values}; skipped ({self.progress.skipped_steps} of "
                           f"skip_nonfinite_steps: {limit})")

    def _stop_for_signal(self) -> None:
        """Ends the run between steps after SIGTERM or SIGINT: a checkpoint of where it stands (unless
        the last step wrote one), the command that continues it, and the exit code a shell gives
        for that signal, 128 + its number."""
        if self._saved_step != self.progress.step:
            self._save()
        self.reporter.note(f"{signal.Signals(self.stop.signum).name}: stopped after step {self.progress.step} of "
                           f"{self.run.total_steps}, checkpoint {self.last_checkpoint}; resume with:\n  "
                           f"{resume_command()}")
        raise SystemExit(128 + self.stop.signum)
