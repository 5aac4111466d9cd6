"""Pieces of the training loop shared by every recipe; the loop itself stays in the recipe."""

from functools import partial
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, ListConfig
from torch.utils.data import DataLoader, Dataset

from tunelite.config import instantiate
from tunelite.data.collate import padded_collate
from tunelite.errors import ConfigError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.training.metric_logging import MetricLoggers
from tunelite.training.device import memory_stats
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


def next_window(batches: Iterator[dict[str, torch.Tensor]], size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The micro-batches of one optimizer step and their labelled-token count, known before the
    first backward so every token weighs the same however the batches split."""
    window = [next(batches) for _ in range(size)]
    return window, int(sum((b["labels"] != IGNORE_INDEX).sum() for b in window))


def forward_backward(
    model: torch.nn.Module, loss_fn: torch.nn.Module, batch: dict[str, torch.Tensor], num_labels: int, device: torch.device
) -> torch.Tensor:
    """One micro-batch's forward and backward, its loss weighted by its share of the step's
    labelled tokens; returns that weighted loss (detached) for logging."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    hidden = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("mask"))
    loss = loss_fn(hidden, batch["labels"], model.output)
    share = (batch["labels"] != IGNORE_INDEX).sum() / num_labels
    (loss * share).backward()
    return loss.detach() * share


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
        self.bar = progress_bar(total_steps, initial=initial_step)

    def report(self, step: int, epoch: int, loss: torch.Tensor, lr: float, num_tokens: int, seconds: float,
               grad_norm: torch.Tensor | None) -> None:
        metrics = {"loss": loss.item(), "lr": lr, "tokens_per_s": num_tokens / seconds}
        self.bar.update(1)
        self.bar.set_postfix(format_metrics(metrics))
        if step % self.log_every == 0 or step == self.total_steps:
            if grad_norm is not None:
                metrics["grad_norm"] = grad_norm.item()
            if self.log_memory:
                metrics.update(memory_stats(self.device))
            self.logger.log_dict({"epoch": epoch, **metrics}, step)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def optimizer_step(
    model: torch.nn.Module, loss_fn: torch.nn.Module, window: list[dict[str, torch.Tensor]], num_labels: int,
    optimizer: Any, clip_grad_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward over the step's micro-batches, clip, step; returns the step's loss and
    the gradient norm before clipping (None without clipping)."""
    device = model.tok_embeddings.weight.device
    step_loss = sum(forward_backward(model, loss_fn, batch, num_labels, device) for batch in window)
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, clip_grad_norm) if clip_grad_norm else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def build_metric_logger(node: DictConfig | ListConfig | list) -> MetricLoggers:
    nodes = list(node) if isinstance(node, (ListConfig, list)) else [node]
    return MetricLoggers([instantiate(n) for n in nodes])


def format_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
