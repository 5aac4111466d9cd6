"""Batches in an order a resumed run can reproduce, and the counts a training loop needs of them.

The recipe passes the collate function, so a recipe with other batches (preference pairs, say)
uses the same loader, sampler and resume logic with its own collate.
"""

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from tunelite.data.sampler import ResumableSampler
from tunelite.errors import ConfigError
from tunelite.modules.loss import IGNORE_INDEX
from tunelite.runtime.ranks import sum_over_ranks

Batch = dict[str, torch.Tensor]


def build_dataloader(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, collate_fn: Callable[[list[Any]], Batch],
    rank: int = 0, world_size: int = 1, drop_last: bool = True,
) -> DataLoader:
    """Batches of `collate_fn(samples)`, in an order derived from (seed, epoch) alone (see ResumableSampler);
    with `world_size` > 1, this rank's share of each global batch."""
    if drop_last and len(dataset) < batch_size * world_size:
        raise ConfigError(
            f"batch_size: {batch_size} x {world_size} process(es) is larger than the dataset ({len(dataset)} samples); lower it"
        )
    sampler = ResumableSampler(len(dataset), shuffle, seed, rank, world_size)
    # Its own generator: otherwise each new iterator draws a seed from the global RNG, and a
    # resumed run, which starts its iterator mid-epoch, would see other dropout masks.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate_fn,
                      generator=torch.Generator())


def steps_per_epoch(loader: DataLoader, gradient_accumulation_steps: int, max_steps_per_epoch: int | None) -> int:
    """Optimizer steps in one epoch: whole groups of `gradient_accumulation_steps` batches, at most
    `max_steps_per_epoch`."""
    batches = loader.sampler.epoch_length // loader.batch_size
    steps = batches // gradient_accumulation_steps
    if steps == 0:
        raise ConfigError(
            f"gradient_accumulation_steps: {gradient_accumulation_steps} exceeds the {batches} batches of an "
            "epoch; lower it or batch_size"
        )
    return min(steps, max_steps_per_epoch) if max_steps_per_epoch else steps


def epoch_batches(loader: DataLoader, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
    """The batches of `epoch`, after the first `skip_batches` (those a resumed run already did)."""
    loader.sampler.set_position(epoch, skip_batches * loader.batch_size)
    return iter(loader)


def step_sample_indices(loader: DataLoader, epoch: int, step_in_epoch: int, gradient_accumulation_steps: int) -> list[int]:
    """The dataset indices (this rank's) of one optimizer step's samples, as epoch_batches visits
    them: what a report on a bad step names, so its rows can be looked at."""
    per_step = loader.batch_size * gradient_accumulation_steps
    return loader.sampler.indices(epoch)[step_in_epoch * per_step:(step_in_epoch + 1) * per_step]


def labelled_tokens(batches: list[Batch], labels_key: str = "labels") -> int:
    """The labelled positions of a step's micro-batches, summed over every rank when distributed.

    Known before the first backward, so that dividing each micro-batch's summed loss by it weighs
    every token the same however the batches (or the ranks) split the step."""
    count = sum((batch[labels_key] != IGNORE_INDEX).sum() for batch in batches)
    return int(sum_over_ranks(torch.as_tensor(count)))
