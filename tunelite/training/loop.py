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


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool, pad_id: int, generator: torch.Generator) -> DataLoader:
    if len(dataset) < batch_size:
        raise ConfigError(f"batch_size: {batch_size} is larger than the dataset ({len(dataset)} samples); lower it")
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=True,
        collate_fn=partial(padded_collate, pad_id=pad_id),
    )


def steps_per_epoch(loader: DataLoader, gradient_accumulation_steps: int, max_steps_per_epoch: int | None) -> int:
    steps = len(loader) // gradient_accumulation_steps
    if steps == 0:
        raise ConfigError(
            f"gradient_accumulation_steps: {gradient_accumulation_steps} exceeds the {len(loader)} batches of an "
            "epoch; lower it or batch_size"
        )
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


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
