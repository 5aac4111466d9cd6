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
from tunelite.training.sampler import ResumableSampler


def build_dataloader(
    dataset: Dataset, batch_size: int, shuffle: bool, pad_id: int, seed: int, rank: int = 0, world_size: int = 1
) -> DataLoader:
    """Batches in an order a resumed run can reproduce (see ResumableSampler)."""
    if len(dataset) < batch_size * world_size:
        raise ConfigError(
            f"batch_size: {batch_size} x {world_size} process(es) is larger than the dataset ({len(dataset)} samples); lower it"
        )
    sampler = ResumableSampler(len(dataset), shuffle, seed, rank, world_size)
    # Its own generator: otherwise each new iterator draws a seed from the global RNG, and a
    # resumed run, which starts its iterator mid-epoch, would see other dropout masks.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
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


def build_metric_logger(node: DictConfig | ListConfig) -> MetricLoggers:
    nodes = list(node) if isinstance(node, ListConfig) else [node]
    return MetricLoggers([instantiate(n) for n in nodes])


def compile_layers(model: torch.nn.Module) -> None:
    """Compiles each transformer layer on its own: one graph reused 32 times keeps compile time
    short, and the loop and loss stay eager."""
    for layer in model.layers:
        layer.compile()


def format_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    return {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in metrics.items()}
