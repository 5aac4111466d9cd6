"""A train / validation partition of rows that two separate builder calls agree on.

The recipe builds the dataset once per partition, so the split cannot come from shared state
or the run's seed: it is a permutation of row indices drawn from a fixed seed, the same in
every process and every run, for a given number of rows.
"""

import random
from collections.abc import Sequence
from typing import TypeVar

from tunelite.errors import ConfigError, DataError

PARTITIONS = ("train", "validation")
# Fixed, so a partition never depends on the run's seed; changing it would move rows between
# the partitions of existing runs.
_PARTITION_SEED = 0x7E57

Row = TypeVar("Row")


def partition_rows(rows: Sequence[Row], val_fraction: float, partition: str, source: str) -> list[Row]:
    """The rows of `partition`, in their original order.

    `round(len(rows) * val_fraction)` rows (at least one when the fraction is above 0) go to
    validation, the rest to train. The permutation comes from `random.Random.random`, whose
    sequence Python guarantees across versions (unlike `shuffle`'s), by sorting on it.
    """
    if partition not in PARTITIONS:
        raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        if partition == "validation":
            raise ConfigError("partition 'validation' needs val_fraction above 0; set the share of rows to hold out")
        return list(rows)
    num_val = max(1, round(len(rows) * val_fraction))
    if num_val >= len(rows):
        raise DataError(
            f"{source}: val_fraction {val_fraction} of {len(rows)} rows leaves no rows to train on; lower it"
        )
    rng = random.Random(_PARTITION_SEED)
    keys = [rng.random() for _ in rows]
    order = sorted(range(len(rows)), key=keys.__getitem__)
    chosen = order[:num_val] if partition == "validation" else order[num_val:]
    return [rows[i] for i in sorted(chosen)]
