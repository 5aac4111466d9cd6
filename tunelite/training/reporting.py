"""What a run shows and logs of each step: the progress bar, and metrics rows for the loggers."""

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from tunelite.config import instantiate
from tunelite.runtime.device import memory_stats
from tunelite.runtime.ranks import is_main_process
from tunelite.training.metric_logging import MetricLoggers
from tunelite.training.progress import progress_bar


def build_metric_loggers(node: DictConfig | ListConfig | list, rank: int = 0) -> MetricLoggers:
    """The loggers a `metric_logger` node names (one node or a list); none but on rank 0, so a
    distributed run logs each step once."""
    nodes = list(node) if isinstance(node, (ListConfig, list)) else [node]
    return MetricLoggers([instantiate(n) for n in nodes] if rank == 0 else [])


class StepReporter:
    """Turns each optimizer step into the progress bar's postfix (loss, lr, tokens/s, with tqdm's
    ETA) and, every `log_every` steps and at the last, a metrics row (plus grad norm, skipped
    steps, peak memory and what the recipe adds) for the configured loggers. Closes the bar and
    the loggers when its block ends."""

    def __init__(self, logger: MetricLoggers, total_steps: int, initial_step: int, device: torch.device,
                 log_every: int, log_memory: bool) -> None:
        self.logger, self.total_steps, self.device = logger, total_steps, device
        self.log_every, self.log_memory = log_every, log_memory
        self.bar = progress_bar(total_steps, initial=initial_step, disable=not is_main_process())

    def __enter__(self) -> "StepReporter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.bar.close()
        self.logger.close()

    def report(self, step: int, epoch: int, loss: torch.Tensor, lr: float, num_tokens: int, started: float,
               grad_norm: torch.Tensor | None, skipped_steps: int = 0, extra: dict[str, float] | None = None) -> None:
        """`started`: time.perf_counter() when the step began. The step's time is taken after its
        loss is read, which waits for the GPU to finish it; taken before, tokens/s would count how
        fast the host queued the work, not how fast the GPU did it (over-reported under compile).
        `extra`: the recipe's own metrics for the row (DPO's rewards, say)."""
        loss_value = loss.item()
        metrics = {"loss": loss_value, "lr": float(lr), "tokens_per_s": num_tokens / (time.perf_counter() - started)}
        self.bar.update(1)
        self.bar.set_postfix(format_metrics(metrics))
        if step % self.log_every == 0 or step == self.total_steps:
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm.item()
            metrics["skipped_steps"] = skipped_steps
            metrics.update(extra or {})
            if self.log_memory:
                metrics.update(memory_stats(self.device))
            self.logger.log_dict({"epoch": epoch, **metrics}, step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """A row of other metrics for `step`, such as a validation loss."""
        self.logger.log_dict(metrics, step)

    def note(self, message: str) -> None:
        """A line on stderr above the progress bar, which stays whole below it."""
        self.bar.write(message, file=sys.stderr)


def format_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
