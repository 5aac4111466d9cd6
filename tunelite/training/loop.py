"""Pieces of the training loop shared by every recipe; the loop itself stays in the recipe."""

import json
import os
import shlex
import signal
import sys
import threading
import time
from functools import partial
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader, Dataset

from tunelite.cli.run import COMMAND_LINE_ENV
from tunelite.config import instantiate
from tunelite.data.collate import padded_collate
from tunelite.distributed.process import is_main_process, set_gradient_sync, sum_over_ranks
from tunelite.errors import ConfigError, NonFiniteError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.training.metric_logging import MetricLoggers
from tunelite.training.device import memory_stats
from tunelite.training.optimizers import OptimizerInBackward
from tunelite.training.progress import progress_bar
from tunelite.training.sampler import ResumableSampler


def build_dataloader(
    dataset: Dataset, batch_size: int, shuffle: bool, pad_id: int, seed: int, rank: int = 0, world_size: int = 1,
    drop_last: bool = True,
) -> DataLoader:
    """Batches in an order a resumed run can reproduce (see ResumableSampler)."""
    if drop_last and len(dataset) < batch_size * world_size:
        raise ConfigError(
            f"batch_size: {batch_size} x {world_size} process(es) is larger than the dataset ({len(dataset)} samples); lower it"
        )
    sampler = ResumableSampler(len(dataset), shuffle, seed, rank, world_size)
    # Its own generator: otherwise each new iterator draws a seed from the global RNG, and a
    # resumed run, which starts its iterator mid-epoch, would see other dropout masks.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=partial(padded_collate, pad_id=pad_id), generator=torch.Generator())


def steps_per_epoch(loader: DataLoader, gradient_accumulation_steps: int, max_steps_per_epoch: int | None) -> int:
    batches = loader.sampler.epoch_length // loader.batch_size
    steps = batches // gradient_accumulation_steps
    if steps == 0:
        raise ConfigError(
            f"gradient_accumulation_steps: {gradient_accumulation_steps} exceeds the {batches} batches of an "
            "epoch; lower it or batch_size"
        )
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


def epoch_batches(loader: DataLoader, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of `epoch`, after the first `skip_batches` (those a resumed run already did)."""
    loader.sampler.set_position(epoch, skip_batches * loader.batch_size)
    return iter(loader)


def window_indices(loader: DataLoader, epoch: int, step_in_epoch: int, size: int) -> list[int]:
    """The dataset indices (this rank's) of one optimizer step's samples, as epoch_batches visits
    them: what a report on a bad step names, so its rows can be looked at."""
    per_step = loader.batch_size * size
    return loader.sampler.indices(epoch)[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]


def next_window(batches: Iterator[dict[str, torch.Tensor]], size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The micro-batches of one optimizer step and their labelled-token count, known before the
    first backward so every token weighs the same however the batches split (or the ranks: the
    count is over every rank's micro-batches when distributed)."""
    window = [next(batches) for _ in range(size)]
    return window, int(sum_over_ranks(sum((b["labels"] != IGNORE_INDEX).sum() for b in window)))


def weighted_loss(
    model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict[str, torch.Tensor], num_labels: int, device: torch.device
) -> torch.Tensor:
    """One micro-batch's forward: its loss weighted by its share of the step's labelled tokens."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("mask"))
    loss = loss_fn(hidden, batch["labels"], model.output)
    share = (batch["labels"] != IGNORE_INDEX).sum() / num_labels
    return loss * share


def forward_backward(
    model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict[str, torch.Tensor], num_labels: int, device: torch.device
) -> torch.Tensor:
    """One micro-batch's forward and backward; returns its weighted loss (detached) for logging."""
    loss = weighted_loss(model, loss_fn, batch, num_labels, device)
    loss.backward()
    return loss.detach()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, loss_fn: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """Mean loss per labelled token over the whole validation set (summed over ranks' shares
    when distributed), with dropout off; leaves the model in training mode."""
    device = model.tok_embeddings.weight.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        n = (batch["labels"] != IGNORE_INDEX).sum()
        hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("mask"))
        total += loss_fn(hidden, batch["labels"], model.output) * n
        count += n
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    model.train()
    return total / count.clamp(min=1)


class StepReporter:
    """Turns each optimizer step into the progress bar's postfix and, every `log_every` steps, a
    metrics row (loss, lr, tokens/s, grad norm, peak memory) for the configured loggers."""

    def __init__(self, logger: MetricLoggers, total_steps: int, initial_step: int, device: torch.device,
                 log_every: int, log_memory: bool) -> None:
        self.logger, self.total_steps, self.device = logger, total_steps, device
        self.log_every, self.log_memory = log_every, log_memory
        self.bar = progress_bar(total_steps, initial=initial_step, disable=not is_main_process())

    def report(self, step: int, epoch: int, loss: torch.Tensor, lr: float, num_tokens: int, started: float,
               grad_norm: torch.Tensor | None, skipped_steps: int = 0) -> None:
        """`started`: time.perf_counter() when the step began. The step's time is taken after its
        loss is read, which waits for the GPU to finish it; taken before, tokens/s would count how
        fast the host queued the work, not how fast the GPU did it (over-reported under compile)."""
        loss_value = loss.item()
        metrics = {"loss": loss_value, "lr": lr, "tokens_per_s": num_tokens / (time.perf_counter() - started)}
        self.bar.update(1)
        self.bar.set_postfix(format_metrics(metrics))
        if step % self.log_every == 0 or step == self.total_steps:
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm.item()
            metrics["skipped_steps"] = skipped_steps
            if self.log_memory:
                metrics.update(memory_stats(self.device))
            self.logger.log_dict({"epoch": epoch, **metrics}, step)

    def note(self, message: str) -> None:
        """A line on stderr above the progress bar, which stays whole below it."""
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def optimizer_step(
    model: torch.nn.Module, loss_fn: torch.nn.Module, window: list[dict[str, torch.Tensor]], num_labels: int,
    optimizer: Any, clip_grad_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward over the step's micro-batches, clip, step; returns the step's loss and
    the gradient norm before clipping.

    When either is not finite the gradients are dropped and the optimizer does not step, so the
    weights stay as they were, and the caller decides whether to go on (StepLoop.step_done skips
    up to skip_nonfinite_steps such steps). The check costs one reduction over the gradients and
    a device sync, which reading the loss for the progress bar makes anyway."""
    device = model.tok_embeddings.weight.device
    if isinstance(optimizer, OptimizerInBackward):
        return _step_in_backward(model, loss_fn, window, num_labels, device)
    losses = []
    for i, batch in enumerate(window):
        # A sharded model reduces gradients across ranks once per step, after the last micro-batch.
        set_gradient_sync(model, i == len(window) - 1)
        losses.append(forward_backward(model, loss_fn, batch, num_labels, device))
    # The whole global batch's loss, so that every rank takes the same decision below.
    step_loss = sum_over_ranks(sum(losses))
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trained if p.grad is not None])
    if torch.isfinite(step_loss) and torch.isfinite(grad_norm):
        if clip_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(trained, clip_grad_norm, grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _step_in_backward(
    model: torch.nn.Module, loss_fn: torch.nn.Module, window: list[dict[str, torch.Tensor]], num_labels: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """optimizer_step for OptimizerInBackward, which steps each weight the moment its gradient is
    ready. The one check that can come before any weight changes is the loss's, between forward
    and backward: a non-finite loss skips backward and so the step (gradient norm None). A finite
    loss whose gradients are not (an overflow inside backward) shows only once the weights have
    taken it; that raises NonFiniteError whatever skip_nonfinite_steps says."""
    (batch,) = window  # optimizer_in_bwd allows no gradient accumulation
    loss = weighted_loss(model, loss_fn, batch, num_labels, device)
    if not torch.isfinite(loss):
        return loss.detach(), None
    norms: list[torch.Tensor] = []
    # Tensor hooks run before the gradient is accumulated, so before the optimizer's own hook.
    hooks = [p.register_hook(lambda grad: norms.append(torch.linalg.vector_norm(grad)))
             for p in model.parameters() if p.requires_grad]
    try:
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    if not torch.isfinite(grad_norm):
        raise NonFiniteError(
            f"the gradient norm is {grad_norm.item()} although the loss ({loss.item():.4g}) is finite; "
            "optimizer_in_bwd: True had already stepped each weight during backward, so the run stops "
            "whatever skip_nonfinite_steps says"
        )
    return loss.detach(), grad_norm


class StopRequest:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) taken as a request to stop after the
    step in progress, with a checkpoint, instead of an end that loses every step since the last one.

    Handlers are installed only while entered, and only in the main thread (the one Python delivers
    signals to). The first signal puts back the system's default handlers, so a second one ends
    the process at once, even inside a C call that never returns to Python (a hung collective);
    all it can cut short is a checkpoint's temporary folder, which the next resume deletes."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python, which Python cannot put back.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for other in self.SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        # A plain print: the handler may run while the progress bar holds its lock.
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint; "
              "send it again to stop at once", file=sys.stderr, flush=True)


def resume_command() -> str:
    """The command line that continues this run from its newest checkpoint: the user's own, as
    `tunelite run` recorded it (in-process, sys.argv holds only the recipe's arguments), else this
    process's, with any resume_from_checkpoint override replaced by resume_from_checkpoint=True."""
    recorded = os.environ.get(COMMAND_LINE_ENV)
    argv = json.loads(recorded) if recorded else [sys.executable, *sys.argv]
    kept = [arg for arg in argv if arg.lstrip("+~").partition("=")[0] != "resume_from_checkpoint"]
    # A config without the key got it from a `+` override, and needs one again.
    added = any(arg.startswith("+resume_from_checkpoint=") for arg in argv)
    return shlex.join([*kept, f"{'+' if added else ''}resume_from_checkpoint=True"])


def build_metric_logger(node: DictConfig | ListConfig | list) -> MetricLoggers:
    nodes = list(node) if isinstance(node, (ListConfig, list)) else [node]
    return MetricLoggers([instantiate(n) for n in nodes])


def format_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
